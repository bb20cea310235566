"""CPU kernel benchmark: CodeQuant LUT kernels against torch F.linear (bf16, fp32) and
llama.cpp's ggml_mul_mat (bf16, IQ4_NL and Q4_0, plain and repacked), side by side in one run.

    python -m benchmarks cpu --out benchmarks/results/cpu-<name>.json

Builds ggml from the llama-cpp-python sdist (benchmarks/llamacpp/build.sh, into
benchmarks/_build/), measures the streaming read bandwidth for 1 and 2 threads, then times
every shape x M x threads x cache mode. "dram": enough weight copies to exceed the
last-level cache several times, cycled so each call streams its weights from memory;
"hot": one copy, called repeatedly. Writes a JSON list of records (see RECORD_KEYS),
a sibling .meta.json (machine, load, bandwidth, versions) and a .png plot.

Two times per CodeQuant record, both medians over the same calls' weight copies:
  us       the kernel timed from C++ (``_lut.time_run``: back-to-back ``linear()`` calls of
           the extension on prepared plans, float32 output preallocated, activation
           quantization included), as the ggml harness times ``ggml_backend_graph_compute``;
  us_call  the Python call ``codequant.kernels.cpu.linear(x, w, act)`` (plan check, output
           allocation, ``_lut.run``), timed from Python as torch's ``F.linear`` is.
Ratios ``vs_*`` are baseline time / this op's time (> 1: this op is faster), each like for
like: vs_ggml_bf16, vs_iq4_nl, vs_q4_0 (ggml, timed in C++) use ``us``; vs_bf16, vs_fp32
(torch, timed in Python) use ``us_call``; vs_iq4_nl_call = ggml IQ4_NL time / ``us_call``.
vs_iq4_nl and vs_q4_0 compare against llama.cpp's repacked layouts (the faster ones; the
plain-layout times are in their own records). gbps (from ``us``) counts each format's own
weight bytes (CodeQuant: indices + codebooks + row sums; ggml: its blocks). pct_bw = gbps /
read bandwidth (same thread count) * 100.

DRAM blocks run in ``--rounds`` rounds (CodeQuant, torch, ggml, then again), each with
freshly allocated weight copies, and every time is the smallest of its rounds' medians:
this machine's memory speed drifts over seconds and differs between allocations, and the
rounds give every op the same chances.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (ACT_BITS, LLC_BYTES, MAX_OTHER_CPU, MIN_SECONDS, command_line, copies_beyond, cpu_median_us, cpu_model, cpu_read_bandwidth,
                               cpu_seconds, random_packed, wait_until_idle)
from codequant.core.activations import ActQuantSpec
from codequant.core.format import PackedWeight
from codequant.kernels import cpu
from codequant.kernels.cpu import _lut

HERE = Path(__file__).resolve().parent
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (768, 2048), (2048, 768), (1408, 2048)]
RECORD_KEYS = ("op", "M", "N", "K", "threads", "cache", "us", "gbps", "vs_bf16", "vs_fp32", "vs_ggml_bf16", "vs_iq4_nl", "vs_q4_0", "pct_bw",
               "us_call", "vs_iq4_nl_call")
CQ_OPS = {f"codequant-{mode}": ActQuantSpec(bits) for mode, bits in ACT_BITS.items()}
GGML_OPS = {  # op name: (ggml type, repack)
    "ggml-bf16": ("bf16", 0),
    "ggml-iq4_nl": ("iq4_nl", 0),
    "ggml-iq4_nl-repack": ("iq4_nl", 1),
    "ggml-q4_0": ("q4_0", 0),
    "ggml-q4_0-repack": ("q4_0", 1),
}


def copies_for(nbytes: int, cache: str) -> int:
    return 1 if cache == "hot" else copies_beyond(LLC_BYTES, nbytes)


def packed_bytes(w: PackedWeight) -> int:
    """Bytes of a packed weight as the CPU kernels read it: indices, codebooks and row sums."""
    return sum(t.numel() * t.element_size() for t in (w.indices, w.codebook, w.row_sum))


def bench_codequant(n, k, ms, threads_list, cache, reps, gen):
    """{(op, M, threads): (native us, weight bytes, Python-call us)}: the call path first
    (cpu_median_us), then as many native calls (_lut.time_run) on the same prepared plans."""
    probe = random_packed((), n, k, "cpu", gen)
    weights = [probe] + [random_packed((), n, k, "cpu", gen) for _ in range(copies_for(packed_bytes(probe), cache) - 1)]
    out = {}
    for m in ms:
        x = torch.randn(m, k, generator=gen)
        y = torch.empty(m, n)
        for name, act in CQ_OPS.items():
            plans = [cpu._cached_plan(w, act)[6] for w in weights]  # load-time preparation, not timed
            for t in threads_list:
                us_call = cpu_median_us(lambda i: cpu.linear(x, weights[i], act, threads=t), len(weights), reps)
                n_calls = max(reps, min(2000, int(MIN_SECONDS * 1e6 / us_call)))
                us = statistics.median(_lut.time_run(plans, x.data_ptr(), 0, m, y.data_ptr(), t, n_calls))
                out[(name, m, t)] = (us, packed_bytes(probe), us_call)
    return out


def bench_torch(n, k, ms, threads_list, cache, reps, gen):
    out = {}
    for name, dtype in (("torch-bf16", torch.bfloat16), ("torch-fp32", torch.float32)):
        probe = torch.randn(n, k, generator=gen).to(dtype)
        weights = [probe] + [torch.randn(n, k, generator=gen).to(dtype) for _ in range(copies_for(probe.nbytes, cache) - 1)]
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(dtype)
            for t in threads_list:
                torch.set_num_threads(t)
                with torch.inference_mode():
                    us = cpu_median_us(lambda i: F.linear(x, weights[i]), len(weights), reps)
                out[(name, m, t)] = (us, probe.numel() * probe.element_size(), None)
        del weights, probe
    return out


def bench_ggml(exe, n, k, ms, threads_list, cache, reps):
    out = {}
    for name, (typ, repack) in GGML_OPS.items():
        bytes_per = {"bf16": 2.0, "iq4_nl": 18 / 32, "q4_0": 18 / 32}[typ]
        nbytes = int(n * k * bytes_per)
        copies = copies_for(nbytes, cache)
        # as many calls as cpu_median_us makes for a call of this size (at ~20 GB/s, M = 1)
        n_reps = max(reps, min(2000, int(MIN_SECONDS / (nbytes / 20e9))))
        cmd = [str(exe), typ, str(repack), str(n), str(k), str(copies), str(n_reps), ",".join(map(str, ms)), ",".join(map(str, threads_list))]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                if repack and r["buffer"] != "CPU_REPACK":
                    raise RuntimeError(f"{name}: weights not in the repack buffer")
                out[(name, r["M"], r["threads"])] = (r["us_median"], r["weight_bytes"], None)
    return out


def merge_min(times: dict, new: dict) -> None:
    """times[key] = elementwise smallest (us, bytes, us_call) over the rounds seen so far."""
    for key, val in new.items():
        old = times.get(key)
        times[key] = val if old is None else tuple(v if o is None else min(o, v) for o, v in zip(old, val))


def build_ggml() -> Path:
    res = subprocess.run(["bash", str(HERE / "llamacpp" / "build.sh")], capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit("llama.cpp build failed")
    return Path(res.stdout.strip().splitlines()[-1])


def make_records(times, n, k, ms, threads_list, cache, bandwidth):
    records = []
    for (name, m, t), (us, nbytes, us_call) in sorted(times.items()):
        gbps = nbytes / us / 1e3
        rec = dict.fromkeys(RECORD_KEYS)
        rec.update(op=name, M=m, N=n, K=k, threads=t, cache=cache, us=round(us, 2), gbps=round(gbps, 2))
        rec["pct_bw"] = round(100 * gbps / bandwidth[t], 1)
        if name.startswith("codequant"):
            rec["us_call"] = round(us_call, 2)
            for key, base, own in (("vs_bf16", "torch-bf16", us_call), ("vs_fp32", "torch-fp32", us_call),
                                   ("vs_ggml_bf16", "ggml-bf16", us), ("vs_iq4_nl", "ggml-iq4_nl-repack", us),
                                   ("vs_q4_0", "ggml-q4_0-repack", us), ("vs_iq4_nl_call", "ggml-iq4_nl-repack", us_call)):
                if (base, m, t) in times:
                    rec[key] = round(times[(base, m, t)][0] / own, 3)
        records.append(rec)
    return records


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in records if r["cache"] == "dram" and r["M"] == 1]
    if not sel:  # the plot shows M = 1 from DRAM only
        return
    shapes = sorted({(r["N"], r["K"]) for r in sel})
    threads = sorted({r["threads"] for r in sel})
    ops = ["codequant-w4a16", "codequant-w4a8", "codequant-w4a4", "ggml-iq4_nl-repack", "ggml-q4_0-repack",
           "ggml-iq4_nl", "ggml-q4_0", "ggml-bf16", "torch-bf16", "torch-fp32"]
    fig, axes = plt.subplots(1, len(threads), figsize=(7 * len(threads), 4.5), squeeze=False)
    for ax, t in zip(axes[0], threads):
        width = 0.8 / len(ops)
        for j, op in enumerate(ops):
            vals = [next((r["gbps"] for r in sel if r["op"] == op and r["threads"] == t and (r["N"], r["K"]) == s), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=op)
        ax.set_xticks([i + 0.4 for i in range(len(shapes))], [f"{n}x{k}" for n, k in shapes], rotation=20)
        ax.set_ylabel("weight GB/s (M=1, DRAM)")
        ax.set_title(f"{t} thread(s)")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--caches", default="dram,hot")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every DRAM block (fresh weight copies each)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    threads_list = [int(v) for v in args.threads.split(",")]
    exe = None if args.skip_llamacpp else build_ggml()
    idle_log: list = []
    wait_until_idle(idle_log)
    load_before = os.getloadavg()
    bandwidth = {t: cpu_read_bandwidth(t) for t in threads_list}
    print("read bandwidth GB/s:", {t: round(b, 1) for t, b in bandwidth.items()}, flush=True)
    gen = torch.Generator().manual_seed(0)
    records = []
    for n, k in shapes:
        for cache in args.caches.split(","):
            for attempt in range(3):  # repeated when other processes ran during it (they distort 2-thread times)
                wait_until_idle(idle_log)
                all0, own0, wall0 = *cpu_seconds(), time.time()
                times = {}
                for _ in range(args.rounds if cache == "dram" else 1):
                    merge_min(times, bench_codequant(n, k, ms, threads_list, cache, args.reps, gen))
                    merge_min(times, bench_torch(n, k, ms, threads_list, cache, args.reps, gen))
                    if exe:
                        merge_min(times, bench_ggml(exe, n, k, ms, threads_list, cache, args.reps))
                all1, own1 = cpu_seconds()
                other = max(0.0, (all1 - all0) - (own1 - own0)) / (time.time() - wall0)
                idle_log.append({"block": f"{n}x{k} {cache}", "attempt": attempt, "other_cpu": round(other, 3)})
                if other <= MAX_OTHER_CPU:
                    break
                print(f"{n}x{k} {cache}: other processes used {other:.0%} of a CPU during the block; repeating it", flush=True)
            recs = make_records(times, n, k, ms, threads_list, cache, bandwidth)
            records += recs
            for r in recs:
                if r["op"].startswith("codequant"):
                    print(json.dumps(r), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, indent=1))
    bandwidth_after = {t: cpu_read_bandwidth(t) for t in threads_list}
    meta = {
        "command": command_line("cpu", argv),
        "machine": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "isa": cpu.isa(),
        "torch": torch.__version__,
        "llama_cpp_python_sdist": None if args.skip_llamacpp else "0.3.36",
        "read_bandwidth_gbps": {str(t): round(b, 2) for t, b in bandwidth.items()},
        "read_bandwidth_gbps_after": {str(t): round(b, 2) for t, b in bandwidth_after.items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "idle_checks": idle_log,
        "idle_rule": f"each block starts after a 1 s sample with <= 10% of the CPUs busy, and is repeated (up to 3 times) "
                     f"when other processes used > {MAX_OTHER_CPU:.0%} of a CPU during it; other_cpu is that share",
        "reps": f"median of >= {args.reps} calls and >= {MIN_SECONDS} s per timing (<= 2000 calls); "
                f"DRAM: smallest median of {args.rounds} rounds, fresh weight copies each",
        "times": "us: CodeQuant kernel timed from C++ (_lut.time_run), like ggml's; us_call: the Python call "
                 "codequant.kernels.cpu.linear, like torch's F.linear; vs_bf16 / vs_fp32 use us_call, "
                 "vs_ggml_bf16 / vs_iq4_nl / vs_q4_0 use us, vs_iq4_nl_call = ggml IQ4_NL / us_call",
        "note": "ratios vs_* = baseline time / op time; vs_iq4_nl / vs_q4_0 against the repacked ggml layouts",
    }
    args.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1))
    plot(records, args.out.with_suffix(".png"))
