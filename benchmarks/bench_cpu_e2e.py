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
benchmarks.common.wait_until_idle) and a round during which other processes used more than
MAX_OTHER_CPU of a CPU is run again (at most 3 tries) unless ``--no-idle-wait``.
``--vocab-size``: the random models' vocab (the issue #21 comparison used 32000). A variant
name with the suffix ``-4k-pages`` (``codequant-w4a8-4k-pages``) runs its own copy of the model
with the kernels' weight copies (interleaved indices, bf16 head) in 4 KiB pages instead of 2 MiB
pages (codequant.kernels.cpu.huge_page_copy), and the read bandwidth is then also measured in 4 KiB pages.
The suffix ``-page-prefetch`` (after it, if both) runs the AVX-512 kernels with one index-stream prefetch
per 128-column step 4 KiB ahead (the Zen 4 rule) where the CPU's default prefetches every line 8 KiB ahead
(Intel, AMD Zen 5: ``_lut.prefetch_lines``).
``--llamacpp PATH``: llama.cpp rows beside them, timed in the same rounds: ``PATH`` is a
``llama-bench`` (``benchmarks/llamacpp/build.sh 0.3.36 llama-bench`` builds it), run on the
same random model written as a GGUF (benchmarks/llamacpp/gguf_model.py: Q4_0 attention,
experts and token embedding, bf16 head) for ``--new-tokens`` generated tokens after a context
of the prompt's length, on each thread count; the report adds the fit for llama.cpp and the
tokens/s ratio CodeQuant / llama.cpp per (layers, threads). Every round also measures the read
bandwidth on each thread count (benchmarks.common.cpu_read_bandwidth, 512 MiB); with several
layer counts each fit gives b against the time to read one layer's weights (layer_read_bytes,
llamacpp_layer_read_bytes) at the median of those bandwidths, and at the median of quick reads
taken right before and after each of its settings (``adjacent_read_gbps``): on a VM whose 2-thread
bandwidth changes within seconds (``cpu-threads-probe``) the end-of-round reads need not match
what the decode steps had.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import codequant.kernels.cpu as cpu_kernels
from benchmarks.common import (ACT_BITS, MAX_OTHER_CPU, QWEN3_30B_A3B, ROOT, command_line, cpu_read_bandwidth, cpu_seconds, quick_read_bandwidth, install_codequant,
                               model_config, random_model, random_packed_on, set_online_hadamard, wait_until_idle)
from codequant.core.activations import ActQuantSpec
from codequant.core.format import PackedWeight, pack
from codequant.kernels import Op, implementations
from codequant.quantizers.codebook import fit_codebooks

ACTS = {f"codequant-{mode}": ActQuantSpec(bits) for mode, bits in ACT_BITS.items()}
SMALL_PAGES = "-4k-pages"  # variant suffix: the kernels' weight copies in 4 KiB pages
PAGE_PREFETCH = "-page-prefetch"  # variant suffix: one index-stream prefetch per step, 4 KiB ahead (not every line)


def act_variant(name: str) -> str:
    """The ACTS name of a variant, without its suffixes."""
    return name.removesuffix(PAGE_PREFETCH).removesuffix(SMALL_PAGES)


def small_pages(name: str) -> bool:
    """Whether a variant's weight copies are in 4 KiB pages."""
    return SMALL_PAGES in name
LLAMACPP = ("llama.cpp-q4_0", "llama-bench")  # (variant, mode) of the llama.cpp rows
GGUF_DIR = ROOT / "benchmarks" / "_build" / "gguf"
PROMPT_TOKENS = 16


def fitted_packed(weight: torch.Tensor) -> PackedWeight:
    """Data-free CodeQuant weight: k-means codebooks, one 16-entry codebook per row."""
    idx, codebook = fit_codebooks(weight.float(), bits=4, group_size=weight.shape[-1])
    return pack(idx, codebook)


def codequant_model(model: nn.Module, act: ActQuantSpec, random: bool) -> nn.Module:
    """A copy of ``model`` with its attention linears and experts on CodeQuant modules (random
    packed weights when ``random``: speed only, with the online Hadamard before the experts' down
    projections where ``codequant quantize`` puts it, i.e. when activations are quantized)."""
    model = copy.deepcopy(model)
    install_codequant(model, act, random_packed_on("cpu") if random else fitted_packed)
    if random:
        set_online_hadamard(model, down=act.enabled)
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


def llama_bench(binary: Path, gguf_path: Path, threads: list[int], new_tokens: int, context: int) -> list[dict]:
    """llama-bench's JSON results of one generation of ``new_tokens`` tokens (after its one-token
    warm-up and ``context`` untimed tokens) per thread count; time per token: samples_ns / new_tokens.
    Micro-batches of one token (``-ub 1``): the context is fed one token at a time, because on a
    CPU with AMX in a VM that does not grant AMX tile state, llama.cpp's batched AMX matmul
    crashes; its one-token calls run (and decode faster than a build without AMX)."""
    out = subprocess.run([str(binary), "-m", str(gguf_path), "-p", "0", "-n", str(new_tokens), "-d", str(context), "-ub", "1",
                          "-t", ",".join(map(str, threads)), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def timed_round(variants: dict, settings: list, prompt: torch.Tensor, new_tokens: int, llama) -> tuple[dict, list, dict, dict, float]:
    """One round: ms per token of every (variant, mode, threads) setting, then of llama.cpp on
    each thread count when ``llama`` (``llama(new_tokens)`` runs llama_bench), then the read
    bandwidth (GB/s) on each thread count; also llama-bench's results, the read bandwidth right
    before and after each setting (their mean per setting: this VM's 2-thread bandwidth changes
    within seconds) and the share of a CPU that other processes used meanwhile."""
    all0, own0, wall0 = *cpu_seconds(), time.time()
    ms, adjacent = {}, {}
    for v, m, t in settings:
        cpu_kernels.HUGE_PAGES = not small_pages(v)  # read when a model's first step makes its copies
        default = cpu_kernels._lut.prefetch_lines(False)  # the CPU's
        cpu_kernels._lut.prefetch_lines(default and not v.endswith(PAGE_PREFETCH))
        before = quick_read_bandwidth(t, not small_pages(v))
        with threads_mode(m, t, variants[v]):
            ms[(v, m, t)] = decode_ms(variants[v], prompt, new_tokens)
        adjacent[(v, m, t)] = (before + quick_read_bandwidth(t, not small_pages(v))) / 2
        cpu_kernels._lut.prefetch_lines(default)
    cpu_kernels.HUGE_PAGES = True
    thread_counts = sorted({t for _, _, t in settings})
    before = {t: quick_read_bandwidth(t) for t in thread_counts} if llama else {}
    results = llama(new_tokens) if llama else []
    for res in results:
        t = res["n_threads"]
        ms[(*LLAMACPP, t)] = 1e-6 * res["samples_ns"][0] / new_tokens
        adjacent[(*LLAMACPP, t)] = (before[t] + quick_read_bandwidth(t)) / 2
    pages = [True, False] if any(small_pages(v) for v, _, _ in settings) else [True]
    gbps = {(t, huge): cpu_read_bandwidth(t, nbytes=1 << 29, reps=3, huge_pages=huge) for t in thread_counts for huge in pages}
    all1, own1 = cpu_seconds()
    return ms, results, gbps, adjacent, max(0.0, (all1 - all0) - (own1 - own0)) / (time.time() - wall0)


def layer_read_bytes(model: nn.Module) -> int:
    """Bytes a CodeQuant decode step reads per decoder layer (layer 0): packed indices and
    codebooks of the attention projections (int8 codebooks with a scale and row sum per row
    when activations are quantized) and of the top-k experts, and the bf16 router."""
    layer = model.model.layers[0]
    experts, router = layer.mlp.experts, layer.mlp.gate

    def packed_bytes(w: PackedWeight, act: ActQuantSpec) -> int:
        rows = w.indices.shape[:-1].numel()
        return w.indices.numel() + (w.codebook.numel() + 8 * rows if act.enabled else 2 * w.codebook.numel())

    attention = sum(packed_bytes(p.packed, p.act) for p in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                            layer.self_attn.v_proj, layer.self_attn.o_proj))
    per_expert = (packed_bytes(experts.gate_up, experts.act) + packed_bytes(experts.down, experts.down_act)) / experts.num_experts
    return int(attention + router.top_k * per_expert + router.weight.numel() * router.weight.element_size())


def llamacpp_layer_read_bytes(config) -> int:
    """The same for the llama.cpp GGUF (gguf_model.py): Q4_0 (18 bytes per 32 weights) attention and
    top-k experts, float32 router."""
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    experts = config.num_experts_per_tok * 3 * config.moe_intermediate_size * h
    return (attention + experts) * 18 // 32 + 4 * config.num_experts * h


MODES = ("decode-threads", "layer-ops", "two-pools")


def threads_mode(mode: str, threads: int, model: nn.Module):
    """Threads of a generation: "decode-threads" (codequant.kernels.cpu.decode_threads with the
    model, what codequant generate does: the kernels and the bf16 lm_head on `threads`, torch's
    other ops on 1, supported models' decode steps one kernel call per layer), "layer-ops" (the
    same without the lean decode step: transformers' decoder layers, op by op) or "two-pools"
    (torch's ops and the kernels each on `threads`: a plain model.generate)."""
    torch.set_num_threads(threads)
    if mode == "two-pools":
        return contextlib.nullcontext()
    return cpu_kernels.decode_threads(model=model, lean=mode == "decode-threads")


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
    ap.add_argument("--modes", default="decode-threads", help=f"comma-separated: {', '.join(MODES)} (see threads_mode)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-idle-wait", action="store_true", help="do not wait for an idle machine (contended runs)")
    ap.add_argument("--vocab-size", type=int, help="vocab of the random models (default: the config's)")
    ap.add_argument("--llamacpp", type=Path, help="llama-bench binary: adds llama.cpp rows (random models only)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = {act_variant(n) for n in names} - {"bf16", *ACTS}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    threads, modes = [int(t) for t in args.threads.split(",")], args.modes.split(",")
    if set(modes) - set(MODES):
        raise SystemExit(f"unknown modes {modes}")
    if (args.llamacpp or args.vocab_size) and not args.random_layers:
        raise SystemExit("--llamacpp and --vocab-size need --random-layers")
    assert any(k.backend == "cpu" for k in implementations(Op.MOE)), "the compiled CPU kernels are not loaded"
    idle_log, round_log, rows, llamacpp_info, gguf_bytes, bytes_per_layer, read_gbps, adjacent_gbps = [], [], [], {}, {}, {}, {}, {}
    vocab = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    for layers in [int(n) for n in args.random_layers.split(",")] if args.random_layers else [0]:
        if layers:
            config = model_config(QWEN3_30B_A3B, layers, **vocab)
            if args.llamacpp:
                from benchmarks.llamacpp.gguf_model import write_gguf

                gguf_path = write_gguf(config, GGUF_DIR / f"qwen3moe-{layers}l-vocab{config.vocab_size}.gguf")
            base = random_model(config, targets_on_meta="bf16" not in names)
            source = f"random-weight Qwen3-30B-A3B-shaped model, {layers} layers, vocab {config.vocab_size}"
        else:
            base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
            source = args.model
        base.generation_config.pad_token_id = base.generation_config.eos_token_id = None
        prompt = torch.randint(0, base.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        variants = {name: base if name == "bf16" else codequant_model(base, ACTS[act_variant(name)], layers > 0)
                    for name in names}
        bytes_per_layer |= {name: layer_read_bytes(model) for name, model in variants.items() if name != "bf16" and layers}
        if args.llamacpp:
            bytes_per_layer[LLAMACPP[0]] = llamacpp_layer_read_bytes(config)
        del base
        if not args.no_idle_wait:
            wait_until_idle(idle_log)
        # Every (variant, mode, threads) once per round, rounds interleaved: a slow period of
        # the machine hits all settings alike; the median over rounds is reported.
        settings = [(v, m, t) for v in variants for m in modes for t in threads]
        samples = {s: [] for s in settings + ([(*LLAMACPP, t) for t in threads] if args.llamacpp else [])}
        llama = functools.partial(llama_bench, args.llamacpp, gguf_path, threads, context=PROMPT_TOKENS) if args.llamacpp else None
        with torch.inference_mode():
            for r in range(args.repeats + 1):  # round 0 warms up
                for attempt in range(3 if r and not args.no_idle_wait else 1):
                    ms, results, gbps, adjacent, other = timed_round(variants, settings, prompt, args.new_tokens if r else 4, llama)
                    round_log.append({"layers": layers, "round": r, "attempt": attempt, "other_cpu": round(other, 3)})
                    if other <= MAX_OTHER_CPU:
                        break
                    print(f"round {r}: other processes used {other:.0%} of a CPU", flush=True)
                if r:
                    for key, x in ms.items():
                        samples[key].append(x)
                    for key, x in gbps.items():
                        read_gbps.setdefault(key, []).append(x)
                    for key, x in adjacent.items():
                        adjacent_gbps.setdefault(key, []).append(x)
                for res in results:
                    llamacpp_info = {k: res[k] for k in ("build_commit", "cpu_info", "repack", "flash_attn", "type_k", "type_v", "poll")}
                    gguf_bytes[layers] = res["model_size"]
        for v, m, t in samples:
            ms = statistics.median(samples[(v, m, t)])
            row = {"model": source, "layers": layers, "variant": v, "mode": m, "threads": t, "ms_per_token": round(ms, 2),
                   "tokens_per_s": round(1e3 / ms, 2), "ms_samples": [round(x, 2) for x in samples[(v, m, t)]]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del variants
    ms_of = {(r["variant"], r["mode"], r["threads"], r["layers"]): r["ms_per_token"] for r in rows}
    fits, side_by_side, vs_llamacpp = [], [], []
    for v, m in dict.fromkeys((r["variant"], r["mode"]) for r in rows):
        by_threads = {t: {n: ms for (v2, m2, t2, n), ms in ms_of.items() if (v2, m2, t2) == (v, m, t)} for t in threads}
        for t, pts in by_threads.items():
            if len(pts) > 1:
                fits.append({"variant": v, "mode": m, "threads": t, **fit(list(pts), list(pts.values()))})
                if v in bytes_per_layer:  # b against the time to read a layer's weights at the measured bandwidth
                    gbps = statistics.median(read_gbps[(t, not small_pages(v))])
                    bound = bytes_per_layer[v] / gbps / 1e6
                    near = statistics.median(adjacent_gbps[(v, m, t)])
                    near_bound = bytes_per_layer[v] / near / 1e6
                    fits[-1] |= {"bytes_per_layer": bytes_per_layer[v], "read_gbps": round(gbps, 2),
                                 "b_at_read_bandwidth_ms": round(bound, 3), "b_over_read_bound": round(fits[-1]["b_ms_per_layer"] / bound, 3),
                                 "adjacent_read_gbps": round(near, 2), "b_over_adjacent_read_bound": round(fits[-1]["b_ms_per_layer"] / near_bound, 3)}
                print(json.dumps(fits[-1]), flush=True)
            if (v, m) != LLAMACPP and args.llamacpp:
                vs_llamacpp.append({"variant": v, "mode": m, "threads": t, "tokens_per_s_ratio_by_layers": {
                    n: round(ms_of[(*LLAMACPP, t, n)] / ms, 3) for n, ms in pts.items()}})
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
        "round_checks": round_log,
        "statistic": "per generation the median interval between decode steps (llama.cpp: llama-bench's time of the "
                     f"generation / tokens); median over {args.repeats} interleaved rounds (round_checks: the share of a "
                     "CPU other processes used during each try of a round)",
        "results": rows,
        "read_gbps_median": {f"{t} threads, {'2 MiB' if huge else '4 KiB'} pages": round(statistics.median(x), 2)
                             for (t, huge), x in sorted(read_gbps.items())},
        "fit_ms_per_token_a_plus_b_x_layers": fits,
        "speedup_over_1_thread_by_layers": side_by_side,
    }
    if args.llamacpp:
        report["llamacpp"] = {**llamacpp_info, "weights": "GGUF from benchmarks/llamacpp/gguf_model.py: attention q/k/v/o, "
                              "experts and token embedding Q4_0, output head bf16, router and norms f32",
                              "gguf_bytes_by_layers": gguf_bytes,
                              "run": f"llama-bench -p 0 -n {args.new_tokens} -d {PROMPT_TOKENS} -ub 1 -t {args.threads} -r 1 -o json, once per round"}
        report["codequant_over_llamacpp_tokens_per_s"] = vs_llamacpp
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
