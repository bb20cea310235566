"""The CPU LUT linear with activations quantized per token against per group of channels
(``--act-group-size``), W4, one thread, weights streamed from DRAM.

    python -m benchmarks cpu-act-groups --out benchmarks/results/cpu-act-groups-<name>.json

Qwen3-30B-A3B shapes (q_proj 4096x2048, o_proj 2048x4096, an expert's gate_up 1536x2048 and
down 2048x768) at M = 1 and 16; activation groups 0 (one scale per token), 64 and 128. Each
time is the Python call ``codequant.kernels.cpu.linear`` cycling through weight copies beyond
the last-level cache (benchmarks.common.cpu_median_us), the best of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import codequant.kernels.cpu as cpu_kernels
from benchmarks.common import command_line, copies_beyond, cpu_median_us, random_packed
from codequant.core.activations import ActQuantSpec
from codequant.utils import atomic_write_text

SHAPES = ((4096, 2048), (2048, 4096), (1536, 2048), (2048, 768))
GROUPS = (0, 64, 128)
LLC_BYTES = 64 << 20


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n, k in SHAPES:
        copies = copies_beyond(LLC_BYTES, n * k // 2)
        weights = [random_packed((), n, k, "cpu") for _ in range(copies)]
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            us = {g: [] for g in GROUPS}
            for _ in range(a.rounds):
                for g in GROUPS:
                    act = ActQuantSpec(4, g)
                    us[g].append(cpu_median_us(lambda i, act=act: cpu_kernels.linear(x, weights[i], act, threads=1), copies, 30))
            best = {g: min(t) for g, t in us.items()}
            rows.append({"shape": f"{n}x{k}", "m": m, **{f"group_{g}_us": round(t, 1) for g, t in best.items()},
                         **{f"group_{g}_over_per_token": round(best[g] / best[0], 2) for g in GROUPS if g}})
            print(json.dumps(rows[-1]), flush=True)
    report = {"command": command_line("cpu-act-groups", argv), "threads": 1,
              "statistic": f"median us per call over weight copies beyond {LLC_BYTES >> 20} MiB, best of {a.rounds} interleaved rounds",
              "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write_text(a.out, json.dumps(report, indent=1))
