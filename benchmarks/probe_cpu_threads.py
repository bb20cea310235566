"""Whether the CPU kernels scale to 2 threads as far as the machine's memory does, process by process.

    python -m benchmarks cpu-threads-probe --processes 6 --out benchmarks/results/cpu-threads-<name>.json

Starts ``--processes`` fresh Python processes one after another. Each measures the streaming read
bandwidth with 1 and 2 threads (``cpu_read_bandwidth``, 512 MiB) and then the W4A8 linear at M = 1
with 1 and 2 threads on the decode shapes of Qwen3-30B-A3B (q/k/v 5120x2048, o_proj 2048x4096, an
expert's gate_up 1536x2048 and down 2048x768, and a large 16384x4096), weights cycled through copies
beyond the last-level cache, timed in C++ (``_lut.time_run``, median of 300 calls). GB/s count the
packed bytes the kernel reads (indices, codebooks, row sums). On a VM the memory a process gets
(or the cores its vCPUs land on) can differ from one process to the next, so each process's kernel
numbers are reported beside its own bandwidth: the ratio kernel / read at 2 threads says whether the
kernels or the machine limit the 2-thread speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.common import LLC_BYTES, command_line, copies_beyond
from codequant.utils import atomic_write_text

SHAPES = {"qkv 5120x2048": (5120, 2048), "o_proj 2048x4096": (2048, 4096), "expert gate_up 1536x2048": (1536, 2048),
          "expert down 2048x768": (2048, 768), "large 16384x4096": (16384, 4096)}


def measure() -> dict:
    """One process's record: read GB/s and W4A8 kernel GB/s per shape, 1 and 2 threads."""
    import torch

    from benchmarks.bench_cpu import packed_bytes
    from benchmarks.common import cpu_read_bandwidth, random_packed
    from codequant.core.activations import ActQuantSpec
    from codequant.kernels import cpu
    from codequant.kernels.cpu import _lut

    rec = {"read_gbps": {t: round(cpu_read_bandwidth(t, 1 << 29, 3), 1) for t in (1, 2)}, "kernel_gbps": {}}
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        probe = random_packed((), n, k, "cpu", gen)
        weights = [probe] + [random_packed((), n, k, "cpu", gen) for _ in range(copies_beyond(LLC_BYTES, packed_bytes(probe)) - 1)]
        plans = [cpu._cached_plan(w, ActQuantSpec(bits=8))[6] for w in weights]  # load-time preparation, not timed
        x, y = torch.randn(1, k), torch.empty(1, n)
        rec["kernel_gbps"][name] = {t: round(packed_bytes(probe) / statistics.median(_lut.time_run(plans, x.data_ptr(), 0, 1, y.data_ptr(), t, 300)) / 1e3, 1)
                                    for t in (1, 2)}
    return rec


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--out", help="the JSON file to write")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure()))
        return
    if not a.out:
        ap.error("--out FILE is required")
    runs = []
    for i in range(a.processes):
        res = subprocess.run([sys.executable, "-m", "benchmarks", "cpu-threads-probe", "--child"],
                             capture_output=True, text=True, check=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        read2 = rec["read_gbps"]["2"]
        rec["kernel_2t_over_read_2t"] = {name: round(v["2"] / read2, 2) for name, v in rec["kernel_gbps"].items()}
        runs.append(rec)
        print(f"process {i}: read {rec['read_gbps']['1']} / {read2} GB/s (1 / 2 threads); kernel 2t / read 2t "
              + ", ".join(f"{name.split()[0]} {r}" for name, r in rec["kernel_2t_over_read_2t"].items()), flush=True)
    atomic_write_text(a.out, json.dumps({"command": command_line("cpu-threads-probe", argv), "shapes": SHAPES, "act_bits": 8, "runs": runs}, indent=1))
