"""End-to-end CPU decode speed: a Qwen3-MoE model with CodeQuant-packed attention and experts
(running on the CPU LUT kernels) against the same model in bf16.

    python -m benchmarks cpu-e2e --model models/codequant-moe-tiny --out benchmarks/results/e2e-cpu-<name>.json

``--model``: the bundled fixture (or any Qwen3-MoE checkpoint); its attention projections
and routed experts are quantized data-free with CodeQuant's k-means codebooks (4-bit, one
16-entry codebook per row); embeddings, norms, routers and lm_head stay bf16.
``--random-layers 2,8``: instead, random-weight Qwen3-30B-A3B-shaped models with 2 and 8
layers (the published config, benchmarks.common.SHAPES: hidden 2048, 128 experts of 768,
top-8, vocab 151936) and random packed weights,
where the weight bytes, not Python overhead, dominate a decode step; with several layer
counts the report fits ms/token = a + b x layers (a: fixed cost per token, b: per layer).
Greedy decoding of ``--new-tokens`` tokens after a short prompt, with the KV cache. For each
variant, threads mode (``--modes``, see threads_mode) and thread count (``--threads``) the time per decode
step, from rounds that run every setting once (interleaved, so a slow period of a shared
machine hits all alike); each model's block starts on an idle machine (see
benchmarks.common.wait_until_idle) unless ``--no-idle-wait``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import codequant.kernels.cpu as cpu_kernels
from benchmarks.common import (ACT_BITS, QWEN3_30B_A3B, command_line, install_codequant, model_config, random_model,
                               random_packed_on, wait_until_idle)
from codequant.core.activations import ActQuantSpec
from codequant.core.format import PackedWeight, pack
from codequant.kernels import Op, implementations
from codequant.quantizers.codebook import fit_codebooks

ACTS = {f"codequant-{mode}": ActQuantSpec(bits) for mode, bits in ACT_BITS.items()}


def fitted_packed(weight: torch.Tensor) -> PackedWeight:
    """Data-free CodeQuant weight: k-means codebooks, one 16-entry codebook per row."""
    idx, codebook = fit_codebooks(weight.float(), bits=4, group_size=weight.shape[-1])
    return pack(idx, codebook)


def codequant_model(model: nn.Module, act: ActQuantSpec, random: bool) -> nn.Module:
    """A copy of ``model`` with its attention linears and experts on CodeQuant modules (random
    packed weights when ``random``: speed only)."""
    model = copy.deepcopy(model)
    install_codequant(model, act, random_packed_on("cpu") if random else fitted_packed)
    return model


class _StepTimes(LogitsProcessor):
    """Records the time of each generation step (called once per new token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def decode_ms(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Median ms per decode step of one greedy generation (prefill excluded: the intervals
    between consecutive steps)."""
    steps = _StepTimes()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         logits_processor=LogitsProcessorList([steps]))
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return 1e3 * statistics.median(b - a for a, b in zip(steps.times, steps.times[1:]))


def threads_mode(mode: str, threads: int, model: nn.Module):
    """Threads of a generation: "decode-threads" (codequant.kernels.cpu.decode_threads with the
    model, what codequant generate does: the kernels and the bf16 lm_head on `threads`, torch's
    other ops on 1) or "two-pools" (torch's ops and the kernels each on `threads`: a plain
    model.generate)."""
    torch.set_num_threads(threads)
    return cpu_kernels.decode_threads(model=model) if mode == "decode-threads" else contextlib.nullcontext()


def fit(layers: list[int], ms: list[float]) -> dict:
    """Least-squares ms/token = a + b * layers."""
    mx, my = statistics.fmean(layers), statistics.fmean(ms)
    b = sum((x - mx) * (y - my) for x, y in zip(layers, ms)) / sum((x - mx) ** 2 for x in layers)
    return {"a_ms": round(my - b * mx, 2), "b_ms_per_layer": round(b, 3)}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/codequant-moe-tiny")
    ap.add_argument("--random-layers", default="", help="comma-separated layer counts of the random Qwen3-shaped model")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default="bf16,codequant-w4a16,codequant-w4a8,codequant-w4a4")
    ap.add_argument("--modes", default="decode-threads", help="comma-separated: decode-threads, two-pools (see threads_mode)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-idle-wait", action="store_true", help="do not wait for an idle machine (contended runs)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - {"bf16", *ACTS}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    threads, modes = [int(t) for t in args.threads.split(",")], args.modes.split(",")
    if set(modes) - {"decode-threads", "two-pools"}:
        raise SystemExit(f"unknown modes {modes}")
    assert any(k.backend == "cpu" for k in implementations(Op.MOE)), "the compiled CPU kernels are not loaded"
    idle_log, rows = [], []
    for layers in [int(n) for n in args.random_layers.split(",")] if args.random_layers else [0]:
        if layers:
            base = random_model(model_config(QWEN3_30B_A3B, layers), targets_on_meta="bf16" not in names)
            source = f"random-weight Qwen3-30B-A3B-shaped model, {layers} layers"
        else:
            base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
            source = args.model
        base.generation_config.pad_token_id = base.generation_config.eos_token_id = None
        prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        variants = {name: base if name == "bf16" else codequant_model(base, ACTS[name], layers > 0) for name in names}
        del base
        if not args.no_idle_wait:
            wait_until_idle(idle_log)
        # Every (variant, mode, threads) once per round, rounds interleaved: a slow period of
        # the machine hits all settings alike; the median over rounds is reported.
        settings = [(v, m, t) for v in variants for m in modes for t in threads]
        samples = {s: [] for s in settings}
        with torch.inference_mode():
            for r in range(args.repeats + 1):
                for v, m, t in settings:
                    with threads_mode(m, t, variants[v]):
                        ms = decode_ms(variants[v], prompt, args.new_tokens if r else 4)
                    if r:  # round 0 warms up
                        samples[(v, m, t)].append(ms)
        for v, m, t in settings:
            ms = statistics.median(samples[(v, m, t)])
            row = {"model": source, "layers": layers, "variant": v, "mode": m, "threads": t, "ms_per_token": round(ms, 2),
                   "tokens_per_s": round(1e3 / ms, 2), "ms_samples": [round(x, 2) for x in samples[(v, m, t)]]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del variants
    fits, side_by_side = [], []
    for v in names:
        for m in modes:
            by_threads = {}
            for t in threads:
                pts = [(r["layers"], r["ms_per_token"]) for r in rows if (r["variant"], r["mode"], r["threads"]) == (v, m, t)]
                by_threads[t] = dict(pts)
                if len({n for n, _ in pts}) > 1:
                    fits.append({"variant": v, "mode": m, "threads": t, **fit(*map(list, zip(*pts)))})
                    print(json.dumps(fits[-1]), flush=True)
            if 1 in by_threads:
                for t in threads:
                    if t != 1:
                        side_by_side.append({"variant": v, "mode": m, "threads": t, "speedup_over_1_thread": {
                            n: round(by_threads[1][n] / ms, 3) for n, ms in by_threads[t].items()}})
    report = {
        "command": command_line("cpu-e2e", argv),
        "unit": "ms per decode step (greedy, KV cache, batch 1); tokens_per_s = 1000 / ms_per_token",
        "new_tokens": args.new_tokens,
        "quantized": "attention q/k/v/o and routed experts: 4-bit indices, one 16-entry codebook per row; rest bf16",
        "loadavg": os.getloadavg(),
        "idle_checks": idle_log if not args.no_idle_wait else "not waited for (contended run)",
        "statistic": f"per generation the median interval between decode steps; median over {args.repeats} interleaved rounds",
        "results": rows,
        "fit_ms_per_token_a_plus_b_x_layers": fits,
        "speedup_over_1_thread_by_layers": side_by_side,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
