"""Whether the CPU kernels scale to 2 threads as far as the machine's memory does, moment by moment.

    python -m benchmarks cpu-threads-probe --rounds 6 --series-seconds 60 --out benchmarks/results/cpu-threads-<name>.json

First a time series: for ``--series-seconds`` the streaming read bandwidth with 2 and then 1 thread
(``quick_read_bandwidth``: 256 MiB, best of 2), over and over. Then ``--rounds`` rounds, each: the read
bandwidth with 1 and 2 threads (512 MiB, best of 3), then the W4A8 linear at M = 1 with 1 and 2 threads on
the decode shapes of Qwen3-30B-A3B (q/k/v 5120x2048, o_proj 2048x4096, an expert's gate_up 1536x2048 and
down 2048x768, and a large 16384x4096), weights cycled through copies beyond the last-level cache, timed
in C++ (``_lut.time_run``, median of 300 calls), then the read bandwidth again. GB/s count the packed
bytes the kernel reads (indices, codebooks, row sums). On a VM the memory bandwidth two vCPUs get can
change from one second to the next (the host's scheduling or other tenants; the cause is not visible from
inside), so each round's kernel numbers are reported
against the bandwidth measured just before and after them: kernel / read at 2 threads says whether the
kernels or the machine limit the 2-thread speed at that moment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_cpu import packed_bytes
from benchmarks.common import LLC_BYTES, command_line, copies_beyond, cpu_read_bandwidth, quick_read_bandwidth, random_packed
from codequant.core.activations import ActQuantSpec
from codequant.kernels import cpu
from codequant.kernels.cpu import _lut
from codequant.utils import atomic_write_text

SHAPES = {"qkv 5120x2048": (5120, 2048), "o_proj 2048x4096": (2048, 4096), "expert gate_up 1536x2048": (1536, 2048),
          "expert down 2048x768": (2048, 768), "large 16384x4096": (16384, 4096)}


def read_series(seconds: float) -> list[dict]:
    """[{t, read_2t, read_1t}] GB/s, sampled back to back for ``seconds``."""
    out, t0 = [], time.time()
    while time.time() - t0 < seconds:
        out.append({"t": round(time.time() - t0, 2), "read_2t": round(quick_read_bandwidth(2), 1),
                    "read_1t": round(quick_read_bandwidth(1), 1)})
    return out


def prepared_shapes(gen: torch.Generator) -> dict:
    """name: (plans of the weight copies, the copies (kept alive with their plans), x, y, packed bytes of one copy)."""
    out = {}
    for name, (n, k) in SHAPES.items():
        probe = random_packed((), n, k, "cpu", gen)
        weights = [probe] + [random_packed((), n, k, "cpu", gen) for _ in range(copies_beyond(LLC_BYTES, packed_bytes(probe)) - 1)]
        plans = [cpu._cached_plan(w, ActQuantSpec(bits=8))[6] for w in weights]  # load-time preparation, not timed
        out[name] = (plans, weights, torch.randn(1, k), torch.empty(1, n), packed_bytes(probe))
    return out


def round_record(shapes: dict, t0: float) -> dict:
    rec = {"t": round(time.time() - t0, 1), "read_gbps_before": {t: round(cpu_read_bandwidth(t, 1 << 29, 3), 1) for t in (1, 2)},
           "kernel_gbps": {}}
    for name, (plans, _, x, y, nbytes) in shapes.items():
        rec["kernel_gbps"][name] = {t: round(nbytes / statistics.median(_lut.time_run(plans, x.data_ptr(), 0, 1, y.data_ptr(), t, 300)) / 1e3, 1)
                                    for t in (1, 2)}
    rec["read_gbps_after"] = {t: round(cpu_read_bandwidth(t, 1 << 29, 3), 1) for t in (1, 2)}
    read2 = (rec["read_gbps_before"][2] + rec["read_gbps_after"][2]) / 2
    rec["kernel_2t_over_read_2t"] = {name: round(v[2] / read2, 2) for name, v in rec["kernel_gbps"].items()}
    return rec


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--series-seconds", type=float, default=60.0)
    ap.add_argument("--out", required=True, help="the JSON file to write")
    a = ap.parse_args(argv)
    series = read_series(a.series_seconds)
    r2 = [s["read_2t"] for s in series]
    print(f"read series, {len(series)} samples: 2 threads {min(r2)}-{max(r2)} GB/s (median {statistics.median(r2)}), "
          f"1 thread median {statistics.median(s['read_1t'] for s in series)}", flush=True)
    shapes, rounds, t0 = prepared_shapes(torch.Generator().manual_seed(0)), [], time.time()
    for i in range(a.rounds):
        rec = round_record(shapes, t0)
        rounds.append(rec)
        print(f"round {i}: read 2t {rec['read_gbps_before'][2]} / {rec['read_gbps_after'][2]} GB/s (before / after); kernel 2t / read 2t "
              + ", ".join(f"{name.split()[0]} {r}" for name, r in rec["kernel_2t_over_read_2t"].items()), flush=True)
    atomic_write_text(a.out, json.dumps({"command": command_line("cpu-threads-probe", argv), "shapes": SHAPES, "act_bits": 8,
                                         "read_series": series, "rounds": rounds}, indent=1))
