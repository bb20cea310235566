"""vLLM serves CodeQuant checkpoints: same greedy tokens and logits as transformers; bad files refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from checkpoints import make_checkpoint  # noqa: E402  (tests/vllm_serving is on sys.path)

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


def test_corrupted_checkpoint_is_refused(served, tmp_path):
    from vllm import LLM

    ckpt, _ = served
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # vLLM re-raises config errors as pydantic's ValidationError (a ValueError) with our message
    with pytest.raises(ValueError, match="file is truncated"):
        LLM(str(bad), dtype="float32", enforce_eager=True, max_model_len=256)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        LLM(str(bad), dtype="float32", enforce_eager=True, max_model_len=256)


def test_low_bit_checkpoint_is_refused(tmp_path):
    """Format 3 stores 2-bit indices as a 2-bit stream; the plugin's loaders read the 4-bit layout only."""
    from vllm import LLM

    ckpt = make_checkpoint(tmp_path / "w2", 16, bits=2)
    with pytest.raises(ValueError, match=r"vLLM cannot serve this codequant checkpoint faithfully: its indices are stored at 2 bits, "
                                         r"and the vLLM plugin reads 4-bit indices only; serve it with transformers"):
        LLM(str(ckpt), dtype="float32", enforce_eager=True, max_model_len=256)
