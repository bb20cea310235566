"""Host cost of one call with the CUDA GEMV's 26 arguments: pybind11 (how codequant calls its
CUDA extension) against a TORCH_LIBRARY op through the dispatcher (positional, ``.default``
and keyword arguments). The bound function is empty and takes CPU tensors, so this runs on any
machine with a C++ compiler; the difference is paid per kernel launch in eager decode.

    python -m benchmarks op-call-overhead --json benchmarks/results/op-call-overhead-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from benchmarks.common import command_line

SOURCE = Path(__file__).resolve().parent / "csrc" / "op_call_overhead.cpp"


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", help="results file")
    args = ap.parse_args(argv)
    import torch
    from torch.utils.cpp_extension import load

    ext = load(name="cq_op_call_overhead", sources=[str(SOURCE)], extra_cflags=["-O2"])
    op = torch.ops.cq_op_call_overhead.gemv
    x, none = torch.zeros(4), torch.empty(0)
    positional = (x, False, none, none, none, none, none, none, none, x, none, none, none, 1, 64, 0, 0, 0, 0, False, 4, 4, 2, False, 0, 0)
    names = [a.name for a in op.default._schema.arguments]
    keywords = dict(zip(names, positional))
    rows = {"pybind11": per_call_us(lambda: ext.gemv(*positional), args.calls),
            "torch.ops positional": per_call_us(lambda: op(*positional), args.calls),
            "torch.ops .default positional": per_call_us(lambda: op.default(*positional), args.calls),
            "torch.ops keywords": per_call_us(lambda: op(**keywords), args.calls)}
    for name, us in rows.items():
        print(f"{name:30s} {us:6.2f} us per call  ({us / rows['pybind11']:.1f}x pybind11)")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command_line("op-call-overhead", argv), "machine": platform.processor() or platform.machine(),
                                               "torch": torch.__version__, "us_per_call": {k: round(v, 2) for k, v in rows.items()}}, indent=1))
