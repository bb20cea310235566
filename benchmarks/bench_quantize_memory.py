"""Peak memory and time of `quantize` on real MoE shapes with random weights.

Writes a model of the real config (Qwen3-30B-A3B, Mixtral-8x7B or DeepSeek-V2-Lite; or
``qwen3_moe_small``, a Qwen3-MoE a quarter as wide for CPU runs) cut to --layers decoder layers,
with random bf16 weights, to local disk, then quantizes it in a child process (default CodeQuant
W4A4, random calibration tokens, --nsamples x --seqlen, on --device) and records seconds per
stage, peak GPU memory (torch's allocator), peak host RSS, and the time extrapolated to the full
depth (total seconds x full layers / layers). ``--no-stream`` loads the whole model first (the
path before streamed weights). Run it with PYTHONPATH pointing at the code to measure (one
checkout per side of a before/after comparison):

    PYTHONPATH=src python3 -m benchmarks quantize-memory --shape qwen3_30b_a3b --layers 4 --json out.json
    PYTHONPATH=src python3 -m benchmarks quantize-memory --device cpu --shape qwen3_moe_small --layers 8 --nsamples 8 --seqlen 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import SHAPES, full_layers, write_random_model

def child(path: str, out: str, nsamples: int, seqlen: int, vocab: int, device: str, options: dict) -> dict:
    """Quantize ``path`` into ``out`` in this process and return its report plus measured peaks."""
    import logging

    import torch

    from codequant import QuantConfig, quantize

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # per-layer progress on stderr, read back by a stopped run
    logging.getLogger("codequant").setLevel(logging.DEBUG)  # and time and peak memory at the end of every stage

    tokens = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    start = time.time()
    result = quantize(path, QuantConfig(device=device, nsamples=nsamples, seqlen=seqlen, **options), out, progress=False, calibration=tokens, overwrite=True)
    report = {k: v for k, v in result.report.items() if k not in ("accf_loss_per_epoch",)}
    report["wall_seconds"] = round(time.time() - start, 1)
    if device.startswith("cuda"):
        report["card"] = torch.cuda.get_device_name()
    return report


LAYER_DONE = re.compile(r"layer (\d+) of \d+ done: (\d+) s elapsed.*peak GPU ([\d.]+) GiB, peak host RSS ([\d.]+) GiB")


def finished_layers(log: str, full: int) -> dict:
    """What a stopped run's progress lines say: layers done, seconds, peaks, and the time
    extrapolated from the layers that finished."""
    done = LAYER_DONE.findall(log)
    if not done:
        return {}
    layers, seconds, gpu, rss = done[-1]
    return {"layers_done": int(layers), "seconds_layers_done": int(seconds), "peak_gpu_gib_so_far": float(gpu), "peak_host_rss_gib_so_far": float(rss),
            "extrapolated_full_model_minutes": round(int(seconds) * full / int(layers) / 60, 1)}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_30b_a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--models", default="/tmp/cq-bench-models", help="where the random models are written")
    ap.add_argument("--label", default="after", help="name of the code measured (before / after)")
    ap.add_argument("--device", default="cuda", help="where layers are calibrated (cuda or cpu)")
    ap.add_argument("--method", default="codequant")
    ap.add_argument("--no-stream", action="store_true", help="load the whole model first (the in-memory path)")
    ap.add_argument("--json", required=True, help="results file (rows are appended)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the quantization may run before it is stopped and recorded as such")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    options = {"method": args.method, "stream": not args.no_stream}
    if args.child:
        out = f"{args.models}/out-{Path(args.child).name}"
        print(json.dumps(child(args.child, out, args.nsamples, args.seqlen, SHAPES[args.shape]["vocab_size"], args.device, options)))
        shutil.rmtree(out, ignore_errors=True)
        return
    path = Path(args.models) / f"{args.shape}-{args.layers}L"
    start = time.time()
    write_random_model(args.shape, args.layers, path)
    full = full_layers(args.shape)
    written = time.time() - start
    cmd = [sys.executable, "-m", "benchmarks", "quantize-memory", "--shape", args.shape, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--json", "-", "--child", str(path),
           "--models", args.models, "--device", args.device, "--method", args.method] + (["--no-stream"] if args.no_stream else [])
    log = path.parent / f"{path.name}.log"
    with open(log, "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(cmd, -1, "", f"stopped after the --timeout of {args.timeout:g} s")
    stderr = log.read_text()
    row = {"label": args.label, "shape": args.shape, "layers": args.layers, "full_layers": full, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "device": args.device, "method": args.method, "stream": not args.no_stream,
           "model_gib_bf16": round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30, 3), "write_seconds": round(written, 1)}
    if proc.returncode:
        row["error"] = (proc.stderr or stderr[-3000:])
        row.update(finished_layers(stderr, full))
    else:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(report)
        row["extrapolated_full_model_minutes"] = round(report["wall_seconds"] * full / args.layers / 60, 1)
    print(json.dumps(row), flush=True)
    out = Path(args.json)
    rows = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(rows + [row], indent=1))
