"""vLLM serves CodeQuant checkpoints: same greedy tokens and logits as transformers (refusals: test_refusals.py)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from tests.vllm_serving.checkpoints import make_checkpoint  # noqa: E402

from codequant.io import load_quantized  # noqa: E402

PROMPTS = [[1, 2, 3, 4], [100, 200, 300, 400, 500, 600], [4000, 17, 9, 81, 2048], [7, 7, 7]]
NEW_TOKENS = 32
TOP_LOGPROBS = 5
LOGPROB_TOL = 2e-3  # float32 on both sides; summation order differs (vLLM's attention and norms)


@pytest.fixture(scope="module", params=[16, 4], ids=["W4A16", "W4A4"])
def served(request, tmp_path_factory):
    """(checkpoint dir, vLLM greedy outputs) for one engine per activation width."""
    from vllm import LLM, SamplingParams

    ckpt = make_checkpoint(tmp_path_factory.mktemp(f"w4a{request.param}") / "ckpt", request.param)
    llm = LLM(str(ckpt), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    del llm
    return ckpt, outputs


def test_greedy_tokens_and_logprobs_match_transformers(served):
    ckpt, outputs = served
    model = load_quantized(ckpt, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)[0, len(prompt):]
        got = out.outputs[0].token_ids
        assert list(got) == expected.tolist(), f"prompt {prompt}"
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        first = out.outputs[0].logprobs[0]
        assert len(first) >= TOP_LOGPROBS
        for token, lp in first.items():
            assert math.isclose(lp.logprob, float(logprobs[token]), abs_tol=LOGPROB_TOL), (prompt, token)
