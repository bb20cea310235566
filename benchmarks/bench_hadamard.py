"""The online block Hadamard two ways: one matmul with H_block against the Kronecker factors
H_a X H_b (a x b = block), per call, on the CPU (1 thread) or the GPU (CUDA graph).

    python -m benchmarks hadamard --device cuda --out benchmarks/results/hadamard-<device>.json

Blocks 64 to 4096 (the down projections of Qwen3-30B-A3B use 256, DeepSeek-V2-Lite 128, Mixtral
2048; ``--o-proj-hadamard`` uses the attention width: 4096 on Qwen3-30B-A3B) on rows of two
blocks, at 1, 16 and 512 tokens; float32 input (the MoE's hidden activations are float32 there).
``one_matmul_wins_up_to``: per token count, the largest block at which one matmul is still the
faster. codequant.core.hadamard.ONE_MATMUL_MAX_BLOCK is set from the CPU's: the largest block where
one matmul wins at one token and the factors do not lose more at 16 tokens (128); on CUDA
(ONE_MATMUL_MAX_BLOCK_CUDA, ..._MANY_ROWS) from the H100's: 1024 at up to 16 rows, 256 above.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import command_line, cpu_median_us, cuda_graph_us
from codequant.core.hadamard import block_hadamard
from codequant.utils import atomic_write_text

BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)
TOKENS = (1, 16, 512)


def time_us(fn, device: str) -> float:
    if device == "cuda":
        return cuda_graph_us([fn] * 10, reps=30)
    return cpu_median_us(lambda i: fn(), copies=1, reps=20)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", required=True, help="JSON file")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(1)
    rows = []
    for block in BLOCKS:
        for t in TOKENS:
            x = torch.randn(t, 2 * block, device=a.device)
            us = {f"{name}_us": round(time_us(lambda f=factored: block_hadamard(x, block, f), a.device), 2)
                  for name, factored in (("one_matmul", False), ("factored", True))}
            rows.append({"block": block, "tokens": t, **us, "factored_speedup": round(us["one_matmul_us"] / us["factored_us"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    wins = {t: max((r["block"] for r in rows if r["tokens"] == t and r["factored_speedup"] < 1), default=0) for t in TOKENS}
    report = {"command": command_line("hadamard", argv),
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu, 1 thread",
              "statistic": "median microseconds per call (CUDA: 10 calls per graph replay, 30 replays)",
              "one_matmul_wins_up_to": wins, "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write_text(a.out, json.dumps(report, indent=1))
    print("largest block where one matmul is faster, per token count:", wins)
