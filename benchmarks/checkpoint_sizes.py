"""Checkpoint sizes of the bundled fixture model at 4, 3 and 2 weight bits (RTN, format 3).

Quantizes models/codequant-moe-tiny with ``codequant quantize --method rtn --wbits B --abits 16``
(per-row codebooks, CPU, text sampled from the model: RTN weights do not depend on it) and
records per bit width the bytes of the weight file, of the packed indices and codebooks, and the
bits per weight read back from the file (``codequant.io.checkpoint_summary``):

    .venv/bin/python -m benchmarks checkpoint-sizes --json benchmarks/results/checkpoint-sizes-fixture.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.common import command_line
from codequant.cli import FIXTURE, REPO_ROOT
from codequant.cli import main as codequant_main
from codequant.io import checkpoint_summary
from codequant.io.checkpoint import read_safetensors_header, weight_files


def stored_bytes(directory: Path, suffix: str) -> int:
    """Bytes of the tensors whose name ends with ``suffix`` in the weight files."""
    total = 0
    for f in weight_files(directory):
        for key, entry in read_safetensors_header(f)[0].items():
            if key.endswith(suffix):
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return total


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--bits", default="4,3,2", help="comma-separated weight bit widths (default 4,3,2)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            out = Path(tmp) / f"w{bits}"
            quantize_argv = ["quantize", str(FIXTURE), "--out", str(out), "--method", "rtn", "--wbits", str(bits), "--abits", "16",
                    "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--no-progress"]
            if codequant_main(quantize_argv) != 0:
                sys.exit(f"codequant {' '.join(quantize_argv)} failed")
            s = checkpoint_summary(out)
            rows.append({
                "wbits": bits, "format_version": s["format_version"], "weight_file_bytes": s["weight_file_bytes"],
                "index_bytes": stored_bytes(out, "indices"), "codebook_bytes": stored_bytes(out, "codebook"),
                "packed_weights": s["packed_weights"], "other_parameters": s["other_parameters"],
                "bits_per_weight": round(s["bits_per_weight"], 4), "bits_per_parameter": round(s["bits_per_parameter"], 4),
                "quantize_command": "codequant " + shlex.join(a.replace(tmp, "TMP").replace(str(REPO_ROOT) + "/", "") for a in quantize_argv),
            })
    record = {"command": command_line("checkpoint-sizes", argv), "model": FIXTURE.name, "checkpoints": rows}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    for r in rows:
        print(f"W{r['wbits']}: {r['weight_file_bytes']} bytes, indices {r['index_bytes']}, codebooks {r['codebook_bytes']}, "
              f"{r['bits_per_weight']:.3f} bits per weight")
