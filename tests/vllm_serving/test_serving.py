"""vLLM serves CodeQuant checkpoints: same greedy tokens and logits as transformers (refusals: test_refusals.py).

The bundled fixture (Qwen3-MoE, trained), quantized W4A16 and W4A4 (one vLLM engine each), and a tiny
random model of each other verified architecture (tests.helpers.tiny_models: 2 layers, hidden 64,
vocabulary 128; DeepSeek-V2 with and without a low-rank query) in one engine each, quantized W4A16 in
layer 0 and W4A4 in layer 1 so that one engine runs both paths of every module kind."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from tests.vllm_serving.checkpoints import make_checkpoint, make_tiny_checkpoint  # noqa: E402

from codequant.io import load_quantized  # noqa: E402

PROMPTS = [[1, 2, 3, 4], [100, 200, 300, 400, 500, 600], [4000, 17, 9, 81, 2048], [7, 7, 7]]
TINY_PROMPTS = [[1, 2, 3, 4], [100, 20, 30, 40, 50, 60], [40, 17, 9, 81, 127], [7, 7, 7]]  # vocabulary 128
NEW_TOKENS = 32
TOP_LOGPROBS = 5
LOGPROB_TOL = 2e-3  # float32 on both sides; summation order differs (vLLM's attention and norms)
# the tiny random models (tests.helpers.tiny_models) of the architectures other than the fixture's
TINY_ARCHITECTURES = ["mixtral", "qwen2_moe", "olmoe", "llama", "qwen3", "deepseek_v2", "deepseek_v2_q_lora"]
TINY_ACT_BITS = (16, 4)  # layer 0 W4A16, layer 1 W4A4
# seed of the random weights: 0 unless, with 4-bit activations, an activation of some prompt lies within
# the two sides' float32 differences of a rounding edge (a tie, not a serving fault: one code flips, then
# the tokens). Mixtral seed 0, all layers W4A4: layer 0's o_proj input 5e-5 (relative) from an edge at
# step 26 of prompt 0 (every earlier step within 1e-6). Checked: seed 0 all-W4A16, seed 1 all-W4A4 and this mix.
TINY_SEEDS = {"mixtral": 1}
# vLLM picks its AMX MLA backend on CPUs with AMX tiles; that backend takes bf16 and DeepSeek's real head
# sizes only (its weight packing refuses the tiny model's 16 input features), so the float32 tiny DeepSeek
# models run vLLM's reference CPU MLA backend, as on CPUs without AMX.
TINY_ENGINE_ARGS = {"deepseek_v2": {"attention_backend": "CPU_MLA"}, "deepseek_v2_q_lora": {"attention_backend": "CPU_MLA"}}


def serve(ckpt, prompts, **engine_args):
    """vLLM's greedy outputs (with the top logprobs of each step) for ``prompts`` from one engine."""
    from vllm import LLM, SamplingParams

    llm = LLM(str(ckpt), dtype="float32", enforce_eager=True, max_model_len=256, seed=0, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    return outputs


def assert_matches_transformers(ckpt, prompts, outputs) -> None:
    model = load_quantized(ckpt, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs):
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


@pytest.fixture(scope="module", params=[(16, False), (4, False), (4, True)], ids=["W4A16", "W4A4", "W4A4-lm_head"])
def served(request, tmp_path_factory):
    """(checkpoint dir, vLLM greedy outputs) for one engine per activation width (and one with a packed lm_head)."""
    act_bits, lm_head = request.param
    ckpt = make_checkpoint(tmp_path_factory.mktemp(f"w4a{act_bits}") / "ckpt", act_bits, lm_head=lm_head)
    return ckpt, serve(ckpt, PROMPTS)


def test_greedy_tokens_and_logprobs_match_transformers(served):
    ckpt, outputs = served
    assert_matches_transformers(ckpt, PROMPTS, outputs)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_architecture_matches_transformers(arch, tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", arch, TINY_ACT_BITS, seed=TINY_SEEDS.get(arch, 0))
    assert_matches_transformers(ckpt, TINY_PROMPTS, serve(ckpt, TINY_PROMPTS, **TINY_ENGINE_ARGS.get(arch, {})))
