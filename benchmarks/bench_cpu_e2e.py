"""End-to-end CPU decode speed: a Qwen3-MoE model with CodeQuant-packed attention and experts
(running on the CPU LUT kernels) against the same model in bf16.

    python benchmarks/bench_cpu_e2e.py --model models/codequant-moe-tiny --out benchmarks/results/e2e-cpu-<name>.json

``--model``: the bundled fixture (or any Qwen3-MoE checkpoint); its attention projections
and routed experts are quantized data-free with CodeQuant's k-means codebooks (4-bit, one
16-entry codebook per row); embeddings, norms, routers and lm_head stay bf16.
``--random-layers 2,8``: instead, random-weight Qwen3-30B-A3B-shaped models with 2 and 8
layers (hidden 2048, 128 experts of 768, top-8, vocab 32000) and random packed weights,
where the weight bytes, not Python overhead, dominate a decode step; with several layer
counts the report fits ms/token = a + b x layers (a: fixed cost per token, b: per layer).
Greedy decoding of ``--new-tokens`` tokens after a short prompt, with the KV cache. For each
variant, threads mode (``--modes``, see threads_mode) and thread count (``--threads``) the time per decode
step, from rounds that run every setting once (interleaved, so a slow period of a shared
machine hits all alike); each model's block starts on an idle machine (see
bench_cpu.wait_until_idle) unless ``--no-idle-wait``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, Qwen3MoeConfig

import codequant.kernels.cpu as cpu_kernels

from codequant.core.format import PackedWeight, pack, padded_columns
from codequant.kernels import Op, implementations
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.core.activations import ActQuantSpec
from codequant.quantizers.codebook import fit_codebooks

ACTS = {"codequant-w4a16": ActQuantSpec(16), "codequant-w4a8": ActQuantSpec(8), "codequant-w4a4": ActQuantSpec(4)}


def _packed(weight: torch.Tensor, random: bool) -> PackedWeight:
    if random:  # speed only: random index bytes and codebooks (row sums unused by W4A16 and recomputed for W4A4/W4A8)
        *lead, n, k = weight.shape
        gen = torch.Generator().manual_seed(n * 31 + k)
        idx = torch.randint(0, 256, (*lead, n, padded_columns(k) // 2), dtype=torch.uint8, generator=gen)
        codebook = (0.02 * torch.randn(*lead, n, 1, 16, generator=gen)).half()
        return PackedWeight(idx, codebook, torch.zeros(*lead, n), k)
    idx, codebook = fit_codebooks(weight.float(), bits=4, group_size=weight.shape[-1])
    return pack(idx, codebook)


def codequant_model(model: nn.Module, act: ActQuantSpec, random: bool) -> nn.Module:
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            q = CodeQuantLinear.from_packed(_packed(lin.weight.data, random), None if lin.bias is None else lin.bias.data, act=act)
            setattr(attn, name, q)
        experts = layer.mlp.experts
        gate_up, down = _packed(experts.gate_up_proj.data, random), _packed(experts.down_proj.data, random)
        layer.mlp.experts = CodeQuantExperts.from_packed(gate_up, down, act)
    return model


def random_model(layers: int, dense: bool) -> nn.Module:
    """The random-weight Qwen3-30B-A3B-shaped model; without ``dense`` its attention projections
    and experts are left on the meta device (codequant_model replaces them), so 8 layers fit in
    a few GB instead of ~10 GB of bf16 experts."""
    cfg = Qwen3MoeConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if dense:
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    for name, p in model.named_parameters():
        if ".experts." in name or any(f"{proj}.weight" in name for proj in ("q_proj", "k_proj", "v_proj", "o_proj")):
            continue
        init = torch.ones(p.shape) if name.endswith("norm.weight") else 0.02 * torch.randn(p.shape)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(init.to(torch.bfloat16), requires_grad=False))
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


def main() -> None:
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
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - {"bf16", *ACTS}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    threads, modes = [int(t) for t in args.threads.split(",")], args.modes.split(",")
    if set(modes) - {"decode-threads", "two-pools"}:
        raise SystemExit(f"unknown modes {modes}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu import wait_until_idle

    assert any(k.backend == "cpu" for k in implementations(Op.MOE)), "the compiled CPU kernels are not loaded"
    idle_log, rows = [], []
    for layers in [int(n) for n in args.random_layers.split(",")] if args.random_layers else [0]:
        if layers:
            base = random_model(layers, dense="bf16" in names)
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
        "command": "python " + " ".join(sys.argv),
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


if __name__ == "__main__":
    main()
