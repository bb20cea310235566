"""Quantize one model with every method and tabulate perplexity and KL against full precision.

A rerun with the same settings skips the rows already in ``results.json``.

All methods share the same calibration tokens and the same activation quantization, and
are evaluated on the same token windows; results go to ``results.json`` (a list of rows),
``results.md`` (the table) and ``results.png`` (KL per method, W4A16 and W4A4).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..calibration.data import eval_windows, load_texts, sample_from_model
from ..calibration.loading import load_model, resolve_device
from ..calibration.pipeline import quantize
from ..calibration.resources import peak_memory
from ..config import QuantConfig
from ..utils import atomic_write_text
from .perplexity import evaluate

log = logging.getLogger("codequant")

MODES = {"w4a16": 16, "w4a4": 4}


def compare(
    model_path: str,
    out: str | os.PathLike,
    methods: list[str],
    modes: list[str],
    data: dict[str, str],
    seqlen: int = 512,
    max_windows: int = 32,
    nsamples: int = 128,
    calib_seqlen: int = 512,
    calib: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from: {', '.join(MODES)}")
    dev = resolve_device(device)
    fp_model, tokenizer = load_model(model_path, torch.float32)
    base = QuantConfig(nsamples=nsamples, seqlen=calib_seqlen, calib=calib, device=str(dev))
    if calib:
        from ..calibration.data import calibration_windows

        tokens = calibration_windows(tokenizer, load_texts(calib, model_path), nsamples, calib_seqlen, base.seed)
    else:
        tokens = sample_from_model(fp_model, tokenizer, nsamples, calib_seqlen, base.seed)
    sets = {name: eval_windows(tokenizer, load_texts(src, model_path), seqlen, max_windows) for name, src in data.items()}
    if not sets:
        sets = {"sampled": sample_from_model(fp_model, tokenizer, max_windows, seqlen, base.seed + 1)}
    settings = {"model": model_path, "calibration_tokens": list(tokens.shape), "calib": calib, "sets": {n: list(w.shape) for n, w in sets.items()}}
    rows = _previous_rows(out / "results.json", settings)
    if not rows:
        fp_model.to(dev)
        rows = [{"method": "full precision", "mode": "16-bit", "seconds": None, **{f"{n}_{k}": v for n, w in sets.items() for k, v in _metrics(fp_model, w, None, progress).items()}}]
        fp_model.to("cpu")
    for method in methods:
        for mode in modes:
            if any(r["method"] == method and r["mode"] == mode for r in rows):
                log.info("%s %s: already in %s", method, mode, out / "results.json")
                continue
            config = QuantConfig.from_dict({**base.to_dict(), "method": method, "abits": MODES[mode]})
            start = time.time()
            result = quantize(copy.deepcopy(fp_model), config, tokenizer=tokenizer, progress=progress, calibration=tokens)
            seconds = time.time() - start
            model = result.model.to(dev)
            fp_model.to(dev)
            row = {"method": method, "mode": mode, "seconds": round(seconds, 1), "bits_per_weight": result.report["bits_per_weight"]}
            for name, windows in sets.items():
                row.update({f"{name}_{k}": v for k, v in _metrics(model, windows, fp_model, progress).items()})
            row.update(peak_memory())
            if "peak_gpu_gib" in row:  # quantize's own peak, which its stage accounting reset since
                row["peak_gpu_gib"] = max(row["peak_gpu_gib"], result.report["peak_gpu_gib"])
            rows.append(row)
            log.info("%s", row)
            fp_model.to("cpu")
            del model, result
            _write(out, rows, list(sets), settings)
    print(format_table(rows, list(sets)))
    return rows


def _metrics(model, windows, ref, progress) -> dict:
    r = evaluate(model, windows, ref, progress=progress)
    return {"ppl": r["perplexity"], "kl": r["kl"], "top1": r["top1_agreement"], "tokens": r["tokens"]}


def format_table(rows: list[dict], sets: list[str]) -> str:
    head = "| method | mode | " + " | ".join(f"{s} ppl | {s} KL | {s} top-1" for s in sets) + " | time (s) |"
    lines = [head, "|" + "---|" * (3 + 3 * len(sets))]
    for r in rows:
        cells = []
        for s in sets:
            kl, top1 = r.get(f"{s}_kl"), r.get(f"{s}_top1")
            cells += [f"{r[f'{s}_ppl']:.3f}", "-" if kl is None else f"{kl:.4f}", "-" if top1 is None else f"{top1:.3f}"]
        lines.append(f"| {r['method']} | {r['mode']} | " + " | ".join(cells) + f" | {r['seconds'] if r['seconds'] is not None else '-'} |")
    return "\n".join(lines)


def _previous_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run with the same settings (a rerun resumes it), else none."""
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    return record["rows"] if record.get("settings") == settings else []


def _write(out: Path, rows: list[dict], sets: list[str], settings: dict) -> None:
    record = {"settings": settings, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "results.md", format_table(rows, sets) + "\n")
    _plot(out / "results.png", rows, sets)


def _plot(path: Path, rows: list[dict], sets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quant = [r for r in rows if r["seconds"] is not None]
    methods = list(dict.fromkeys(r["method"] for r in quant))
    modes = list(dict.fromkeys(r["mode"] for r in quant))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.8), squeeze=False)
    width = 0.8 / max(len(modes), 1)
    for ax, s in zip(axes[0], sets):
        for j, mode in enumerate(modes):
            vals = [next((r[f"{s}_kl"] for r in quant if r["method"] == m and r["mode"] == mode), float("nan")) for m in methods]
            ax.bar([i + j * width for i in range(len(methods))], vals, width, label=mode.upper())
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(methods))], methods, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("KL(full precision || quantized)")
        ax.set_title(s)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
