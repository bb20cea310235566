"""The CPU linear kernels of this tree against another build of the extension, in one process.

Both builds of ``codequant.kernels.cpu._lut`` are loaded side by side (each its own shared
object: its own thread pool and ISA switch), plans are made on each, and every case is timed
from C++ (``_lut.time_run``, activation quantization included, as ``python -m benchmarks cpu``
times ``us``) in alternation, old then new, ``--rounds`` times; a case's time is the median of
its rounds. "hot": one weight, called back to back (the kernel's own speed, weights in L2/L3);
"dram": weight copies beyond the last-level cache, cycled (the speed a decode step sees).
Both builds must give the same outputs bit for bit where their arithmetic is the same.

Make the baseline from an earlier commit, then run from the repository root:

    git worktree add /tmp/base <rev> && (cd /tmp/base && python setup.py build_ext --inplace)
    python -m benchmarks cpu-build-ab --baseline /tmp/base/src/codequant/kernels/cpu/_lut*.so \\
        --baseline-rev <rev> --out benchmarks/results/cpu-build-ab-<name>.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
from pathlib import Path

import torch

from benchmarks.bench_cpu import packed_bytes
from benchmarks.common import LLC_BYTES, command_line, copies_beyond, cpu_model, random_packed
from codequant.core.activations import ActQuantSpec
from codequant.kernels import cpu as cpu_kernels
from codequant.utils import atomic_write_text

ACTS = {"w4a16": ActQuantSpec(16), "w4a8": ActQuantSpec(8), "w4a4": ActQuantSpec(4), "w4a4-g32": ActQuantSpec(4, 32),
        "w4a8-g128": ActQuantSpec(8, 128)}
SHAPES = "2048x768,1536x2048,4096x2048"  # N x K of Qwen3-30B-A3B: expert down, expert gate_up, q_proj


def load_build(path: Path, tag: str):
    """The extension module in ``path`` under its own package name ``tag``."""
    spec = importlib.util.spec_from_file_location(f"{tag}._lut", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plans_on(lut, isa: str, weights: list, act: ActQuantSpec) -> list:
    """Plan capsules of ``weights`` made by the build ``lut`` on instruction set ``isa``."""
    cpu_kernels._lut = lut
    lut.set_isa(isa)
    cpu_kernels._isa_epoch[0] += 1  # the plan cache is per build and ISA
    return [cpu_kernels._cached_plan(w, act)[6] for w in weights]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks cpu-build-ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the other build's _lut shared object")
    ap.add_argument("--baseline-rev", default="", help="what the baseline was built from (recorded)")
    ap.add_argument("--isas", default=",".join(i for i in ("avx512", "avx2") if i in cpu_kernels.available_isas()))
    ap.add_argument("--acts", default=",".join(ACTS))
    ap.add_argument("--shapes", default=SHAPES, help="N x K, comma-separated")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--modes", default="hot,dram")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    new_lut, isa0 = cpu_kernels._lut, cpu_kernels.isa()
    builds = {"baseline": load_build(args.baseline, "baseline_build"), "this": new_lut}
    torch.manual_seed(0)
    records = []
    try:
        for mode in args.modes.split(","):
            for n, k in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
                weights = [random_packed((), n, k, "cpu")]
                weights += [random_packed((), n, k, "cpu") for _ in range(0 if mode == "hot" else copies_beyond(LLC_BYTES, packed_bytes(weights[0])) - 1)]
                copies = len(weights)
                for isa in args.isas.split(","):
                    for act_name in args.acts.split(","):
                        act = ACTS[act_name]
                        plans = {tag: plans_on(lut, isa, weights, act) for tag, lut in builds.items()}
                        for m in map(int, args.ms.split(",")):
                            x = torch.randn(m, k).to(torch.bfloat16)
                            ys = {tag: torch.empty(m, n) for tag in builds}
                            reps = max(100, 4 * copies)
                            us = {tag: [] for tag in builds}
                            for _ in range(args.rounds):
                                for tag, lut in builds.items():
                                    us[tag].append(statistics.median(lut.time_run(plans[tag], x.data_ptr(), 1, m, ys[tag].data_ptr(), 1, reps)))
                            old, new = statistics.median(us["baseline"]), statistics.median(us["this"])
                            rec = dict(mode=mode, isa=isa, act=act_name, n=n, k=k, m=m, copies=copies, baseline_us=old, this_us=new,
                                       speedup=old / new, same_output=bool(torch.equal(ys["baseline"], ys["this"])))
                            records.append(rec)
                            print(f"{mode:4s} {isa:6s} {act_name:9s} {n}x{k} M{m:<2d} baseline {old:8.1f} us  this {new:8.1f} us  "
                                  f"x{old / new:.2f}{'' if rec['same_output'] else '  (outputs differ)'}", flush=True)
    finally:
        cpu_kernels._lut = new_lut
        new_lut.set_isa(isa0)
        cpu_kernels._isa_epoch[0] += 1
    if args.out:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = dict(command=command_line("cpu-build-ab", argv), this_rev=rev, baseline_rev=args.baseline_rev,
                    cpu=cpu_model(), threads=1)
        atomic_write_text(args.out, json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
        print("wrote", args.out)
