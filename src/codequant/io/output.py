"""Where a quantization run may write, checked before any work starts, and what a resume must match.

``--out`` may be a new path, an empty directory, a directory holding an earlier CodeQuant
checkpoint (replaced only with ``overwrite``), and ``OUT.partial`` the state of an interrupted
run of the same source model, settings and calibration data (resumed). It is never a file, the
source model's directory (or a directory inside or around it), or a non-empty directory that is
not a CodeQuant checkpoint, and its parent must be writable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .checkpoint import CONFIG_NAME, INDEX_FILE, QUANT_METHOD, SINGLE_FILE

MANIFEST = "manifest.json"
LAYER_FILES = 2  # layout of OUT.partial's layer files (2: every quantized module's full spec, read through the module registry)


class OutputError(ValueError):
    """An output location that would overwrite something the user owns, or cannot be written."""


def is_codequant_checkpoint(directory: Path) -> bool:
    config = directory / CONFIG_NAME
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_output(out: str | os.PathLike, source: str | os.PathLike | None, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that would destroy something the user owns or cannot be written (see the module doc)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is an existing file; give a directory path (a new one, or an earlier CodeQuant output)")
    if source is not None and Path(source).expanduser().exists():
        src, target = Path(source).expanduser().resolve(), out.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise OutputError(
                f"--out {out} is the source model's directory {src} (or inside or around it); writing there would replace "
                "the full-precision model; choose another --out"
            )
    if out.is_dir() and any(out.iterdir()):
        if not is_codequant_checkpoint(out):
            raise OutputError(
                f"--out {out} is a non-empty directory that is not a CodeQuant checkpoint; its files would be lost; "
                "choose a new or empty directory"
            )
        if not overwrite:
            raise OutputError(f"--out {out} already holds a CodeQuant checkpoint; pass --overwrite to replace it, or choose another --out")
    parent = _nearest_existing(out.parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write in {parent} ({err.strerror}); choose an --out on a writable location") from None


def partial_dir(out: str | os.PathLike) -> Path:
    """Where an interrupted run to ``out`` keeps its finished layers: ``OUT.partial``."""
    return Path(f"{out}.partial")


def source_fingerprint(source: str | os.PathLike) -> dict:
    """{"model": path or hub id, "sha256": digest of its config.json and weight index (or weight file header)}."""
    path = Path(source).expanduser()
    if not (path / CONFIG_NAME).is_file():
        return {"model": str(source), "sha256": None}
    h = hashlib.sha256((path / CONFIG_NAME).read_bytes())
    if (path / INDEX_FILE).is_file():
        h.update((path / INDEX_FILE).read_bytes())
    elif (path / SINGLE_FILE).is_file():
        with open(path / SINGLE_FILE, "rb") as f:
            head = f.read(8)
            h.update(head + f.read(int.from_bytes(head, "little")))
    return {"model": str(path.resolve()), "sha256": h.hexdigest()}


def data_fingerprint(calib: str | None) -> str | None:
    """sha256 over a local calibration file or directory (file names and bytes); a hub name as given; None when sampled."""
    if calib is None:
        return None
    path = Path(calib).expanduser()
    if not path.exists():
        return calib
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(f.relative_to(path.parent if path.is_file() else path)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def run_record(source: str | os.PathLike | None, settings: dict, calib: str | None) -> dict:
    """What identifies a run for resume: the source model, every setting that changes the result, the calibration data."""
    return {
        "layer_files": LAYER_FILES,
        "source": source_fingerprint(source) if source is not None else None,
        "settings": settings,
        "calibration": data_fingerprint(calib),
    }


def start_or_resume(partial: Path, record: dict, create: bool = True) -> bool:
    """Check an existing ``partial`` manifest against ``record`` (a different source, setting or
    calibration data is refused), or (``create``) make ``partial`` with ``record`` as its manifest.

    Returns True when resuming.
    """
    manifest = partial / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("layer_files") != record["layer_files"]:
            raise OutputError(f"{partial} holds an interrupted run of an earlier codequant, whose layer files this one cannot read; "
                              f"delete {partial} to start over")
        for key, what in (("source", "another source model"), ("settings", "other settings"), ("calibration", "other calibration data")):
            if found.get(key) != record[key]:
                detail = ""
                if key == "settings":
                    old, new = found.get(key) or {}, record[key]
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    detail = " (" + ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in diff) + ")"
                elif key == "source":
                    detail = f" ({(found.get(key) or {}).get('model')} then, {(record[key] or {}).get('model')} now)"
                raise OutputError(
                    f"{partial} holds an interrupted run with {what}{detail}; rerun that command to resume it, "
                    f"or delete {partial} to start over"
                )
        return True
    if not create:
        return False
    from ..utils import atomic_write_text

    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return False
