"""Deployable CodeQuant checkpoints: packed weights in safetensors, described in config.json.

A checkpoint directory holds

``config.json``
    The model's transformers config plus ``quantization_config`` (schema below) and
    ``codequant_rms_norms`` (the LayerNorms that CodeQuant replaced by RMSNorm).
``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)
    Every tensor of ``model.state_dict()`` except the ``weight`` of quantized routers (it is
    rebuilt from the router's codebook at load) and tied copies. Packed modules store the
    packed tensors of :mod:`codequant.core.format` in their disk layout (at the module's index bit
    width): ``indices`` uint8, ``codebook`` float16, ``row_sum`` float32 (experts: ``gate_up_*``
    and ``down_*``).
``generation_config.json``, tokenizer files (when given).

``quantization_config``::

    quant_method      "codequant"
    format_version    int, codequant.core.format.FORMAT_VERSION of the writer
    codequant_version str, the writer's codequant version (informative)
    bits              int, index bits of every codebook (2^bits centroids used per codebook)
    group_size        int, 0 when every codebook covers a whole row, else the (most common) group size
    act_bits          int, smallest activation bit width of any packed module (16: none quantized)
    act_group_size    int, activation group size of the module(s) with act_bits (0: per token)
    modules           {module name: spec}; spec["kind"] is one of
        "linear":   in_features, out_features, group_size, bits, act, hadamard_block, bias
        "experts":  num_experts, hidden_dim, intermediate_dim, group_size, down_group_size,
                    bits, act, down_act, hadamard_block, activation ("silu": h = silu(x Wg^T) * (x Wu^T))
        "router":   in_features, out_features, group_size, bits, act
        "rms_norm": hidden_size, eps, bias
        where act = {"bits", "group_size", "clip"} (an ActQuantSpec)
    rms_norms         [module name], the RMSNorms that replaced LayerNorms
    checksums         {file name: sha256 hex digest} of every file read or executed at load:
                      the weight files, the weight index and codequant_remote.py
    extra             free-form JSON from the pipeline (method, rotations in effect, calibration data)

The per-module specs are authoritative; the top-level numbers summarize them. The schema is
checked by :mod:`codequant.io.schema`; each kind's spec is written and read by its module class
(:mod:`codequant.modules.registry`). Nothing is
pickled: tensors live in safetensors, everything else in JSON.

Since format version 2 the meaning of the packed tensors is bound to them: the header metadata
of each weight file holds ``quant_method``, ``format_version``, ``codequant_summary`` (the
top-level fields ``bits``, ``group_size``, ``act_bits``, ``act_group_size``) and
``codequant_specs`` (the spec of every module with a tensor in that file), all covered by the
file's checksum. :func:`verify_checkpoint_files` compares them with config.json at every load.
Since format version 3 indices and codebooks are stored at the module's index bit width
(:func:`codequant.core.format.pack_for_disk`); format 2 checkpoints are refused (re-quantize them).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.format import FORMAT_VERSION, PackedWeight, pack_for_disk, unpack_from_disk
from ..modules.attention import FusedQKV
from ..modules.linear import CodeQuantLinear
from ..modules.registry import module_kind, quantized_modules
from ..utils import current_umask
from .schema import (
    FLOAT_DTYPES,
    PACKED_PARTS,
    QUANT_METHOD,
    SUMMARY_KEYS,
    CheckpointError,
    check_quantization_config,
    expected_packed_tensors,
    packed_layout,
    packed_suffixes,
    summary,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

_ST_SIZES = {"U8": 1, "I8": 1, "BOOL": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# ----------------------------------------------------------------------------------------------
# walking a quantized model


def _max_index(packed: torch.Tensor) -> int:
    if not packed.numel():
        return 0
    return int(torch.maximum(packed & 0xF, packed >> 4).max())


def infer_bits(model: nn.Module) -> int:
    """The fewest bits that hold every stored index (at least 1)."""
    top = 0
    for module in quantized_modules(model).values():
        for w in module.packed_weights().values():
            top = max(top, _max_index(w.indices))
    return max(1, math.ceil(math.log2(top + 1)))


def build_quantization_config(model: nn.Module, bits: int | None = None, extra: dict | None = None) -> dict:
    """The ``quantization_config`` dict of a quantized model (checksums left empty)."""
    from .. import __version__

    if any(isinstance(module, FusedQKV) for module in model.modules()):
        raise ValueError("the model's q/k/v projections are fused (fuse_qkv, applied when a checkpoint loads on CUDA); "
                         "a checkpoint stores them apart: save the model before fusing")
    modules = quantized_modules(model)
    if not any(module.packed_parts for module in modules.values()):
        raise ValueError("the model has no CodeQuant modules (CodeQuantLinear, CodeQuantExperts or CodeQuantRouter)")
    bits = infer_bits(model) if bits is None else int(bits)
    if not 1 <= bits <= 4:
        raise ValueError(f"bits must be 1..4 for format v{FORMAT_VERSION}, got {bits}")
    specs = {name: module.spec(bits) for name, module in modules.items()}
    if extra is not None:
        try:
            extra = json.loads(json.dumps(extra))
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra must be JSON-serializable (nothing is pickled): {err}") from None
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "codequant_version": __version__,
        "bits": bits,
        **summary(specs),
        "modules": specs,
        "rms_norms": sorted(n for n, s in specs.items() if s["kind"] == "rms_norm"),
        "checksums": {},
        "extra": extra or {},
    }


# ----------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging directory inside ``PATH.partial/``; on success it replaces ``path`` by renames.

    Nothing is staged beside ``path``: a writer killed at any point leaves at most ``PATH.partial``
    (where ``codequant quantize`` resumes), never a hidden directory. An existing ``path`` is moved
    into ``PATH.partial`` first and deleted only after the new directory is in place. On an
    exception the staging directory is removed and ``path`` is left untouched. ``PATH.partial``
    is removed at the end when this call created it.
    """
    from .output import partial_dir

    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    partial = partial_dir(path)
    created = not partial.exists()
    partial.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=partial))
    try:
        yield tmp
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; outputs get the user's usual permissions
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = partial / f"replaced-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if created:
            shutil.rmtree(partial, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_state_dict(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict without the tensors quantized modules rebuild
    at load (routers' weights) and tied copies (and without the modules named in ``exclude``)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{p}." for p in exclude))}
    skip = {f"{name}.{t}" for name, module in quantized_modules(model).items() for t in module.rebuilt_tensors}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out, seen = {}, {}
    for key, t in state.items():
        if key in skip:
            continue
        ptr = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key in tied and ptr is not None and ptr in seen:
            continue  # a tied copy: from_pretrained ties it again
        t = t.detach().to("cpu").contiguous()
        if ptr is not None and ptr in seen:
            t = t.clone()  # shared storage that is not declared tied: store a copy
        if ptr is not None:
            seen.setdefault(ptr, key)
        out[key] = t
    return out


def stored_tensors(state: dict[str, torch.Tensor], modules: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors as written: packed ones in their disk layout at their module's index bits
    (:func:`codequant.core.format.pack_for_disk`), the rest as they are."""
    out = {}
    for key, t in state.items():
        name = module_of(key, modules)
        packed = name is not None and key.rpartition(".")[2] in packed_suffixes()
        out[key] = pack_for_disk(key, t, modules[name]["bits"]) if packed else t
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    extra: dict | None = None,
    *,
    bits: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    saved_elsewhere: dict[str, Callable[[], dict[str, torch.Tensor]]] | None = None,
) -> Path:
    """Write ``model`` (a transformers model with CodeQuant modules) as a deployable checkpoint.

    The directory is written atomically (see :func:`atomic_directory`) and can be loaded with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` once ``codequant`` is imported.
    ``bits`` defaults to the fewest bits holding every stored index; ``extra`` (JSON only)
    is recorded under ``quantization_config["extra"]``.

    ``saved_elsewhere`` {module name: loader}: modules not in memory (on the meta device; give
    ``bits``), whose checkpoint tensors (names relative to the model) each loader returns. Each
    becomes one weight file of its own, read when its turn comes, so writing holds one at a time.
    """
    saved_elsewhere = saved_elsewhere or {}
    qconfig = build_quantization_config(model, bits, extra)
    state = stored_tensors(checkpoint_state_dict(model, tuple(saved_elsewhere)), qconfig["modules"])
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    config.codequant_rms_norms = qconfig["rms_norms"]
    config.architectures = [type(model).__name__]
    embeddings = model.get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        config.dtype = embeddings.weight.dtype
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, CodeQuantLinear):
        config.tie_word_embeddings = False  # a packed lm_head is not tied to the float embeddings
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    shards = [lambda shard=shard: shard for shard in _shards(state, max_shard_bytes)]
    shards += [lambda load=load: stored_tensors(load(), qconfig["modules"]) for load in saved_elsewhere.values()]
    with atomic_directory(out_dir) as tmp:
        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map, total = {}, 0
        for name, load in zip(names, shards):
            shard = load()
            save_file(shard, str(tmp / name), metadata=bound_metadata(qconfig, shard))
            weight_map.update(dict.fromkeys(shard, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_remote_code_entry(tmp, config, type(model).__name__)
        for name in checked_files(tmp):
            qconfig["checksums"][name] = sha256_file(tmp / name)
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("wrote CodeQuant checkpoint %s (%d files)", out_dir, len(names))
    return Path(out_dir)


REMOTE_CODE_FILE = "codequant_remote.py"


def module_of(key: str, modules: dict) -> str | None:
    """The module of ``modules`` that owns tensor ``key`` (the longest matching name), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def bound_metadata(qconfig: dict, tensors) -> dict[str, str]:
    """The safetensors header metadata that binds a weight file's tensors to their meaning:
    the format version, the top-level summary and the spec of every module with a tensor here."""
    owners = {module_of(key, qconfig["modules"]) for key in tensors} - {None}
    return {
        "format": "pt",
        "quant_method": QUANT_METHOD,
        "format_version": str(FORMAT_VERSION),
        "codequant_summary": json.dumps({k: qconfig[k] for k in SUMMARY_KEYS}, sort_keys=True),
        "codequant_specs": json.dumps({name: qconfig["modules"][name] for name in sorted(owners)}, sort_keys=True),
    }


def checked_files(directory: Path) -> list[str]:
    """Names of the files of a checkpoint that are read or executed at load (all under checksums)."""
    return [f.name for f in weight_files(directory)] + [n for n in (INDEX_FILE, REMOTE_CODE_FILE) if (directory / n).is_file()]


def _write_remote_code_entry(directory: Path, config, class_name: str) -> None:
    """Let loaders that never import codequant open the checkpoint with ``trust_remote_code=True``
    (``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``): ``auto_map``
    points AutoConfig and AutoModelForCausalLM at subclasses whose module imports codequant,
    which registers the quantizer before anything reads ``quantization_config``."""
    config_name = type(config).__name__
    (directory / REMOTE_CODE_FILE).write_text(
        '"""Opening this CodeQuant checkpoint with trust_remote_code=True imports codequant\n'
        '(pip install codequant), which registers the \'codequant\' quantization method."""\n\n'
        "import codequant  # noqa: F401\n"
        f"from transformers import {class_name} as _Model, {config_name} as _Config\n\n\n"
        f"class CodeQuant{config_name}(_Config):\n    pass\n\n\n"
        f"class CodeQuant{class_name}(_Model):\n    config_class = CodeQuant{config_name}\n"
    )
    module = REMOTE_CODE_FILE[:-3]
    config.auto_map = {"AutoConfig": f"{module}.CodeQuant{config_name}", "AutoModelForCausalLM": f"{module}.CodeQuant{class_name}"}


# ----------------------------------------------------------------------------------------------
# reading and checking


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors {name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file.

    Raises :class:`CheckpointError` on a truncated or unreadable file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"codequant checkpoint {path}: file is truncated ({size} bytes, no safetensors header)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(
                f"codequant checkpoint {path}: file is truncated ({size} bytes, its header alone needs {n + 8}); "
                "copy or export it again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        for key, v in header.items():
            begin, stop = (int(x) for x in v["data_offsets"])
            need = math.prod(v["shape"]) * _ST_SIZES.get(v["dtype"], 1)
            if stop - begin != need:
                raise ValueError(f"tensor {key} spans {stop - begin} bytes, its shape and dtype need {need}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"codequant checkpoint {path}: not a valid safetensors file ({err})") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"codequant checkpoint {path}: file is truncated ({size} bytes, its header describes {8 + n + end}); "
            "copy or export it again"
        )
    return header, metadata


def verify_checksums(files: list[str | os.PathLike], checksums: dict[str, str]) -> None:
    """Compare each file's sha256 with the digest recorded at save time."""
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise CheckpointError(f"codequant checkpoint: {f} is missing (its checksum is recorded); copy the whole checkpoint directory")
        recorded = checksums.get(f.name)
        if recorded is None:
            raise CheckpointError(f"codequant checkpoint {f}: no checksum recorded for {f.name} in quantization_config")
        found = sha256_file(f)
        if found != recorded:
            raise CheckpointError(
                f"codequant checkpoint {f}: sha256 checksum mismatch (recorded {recorded[:16]}..., found {found[:16]}...); "
                "the file is corrupted or was modified after export"
            )


def verify_remote_code(directory: str | os.PathLike, module_file: str) -> None:
    """Before transformers executes ``module_file`` of ``directory`` (``trust_remote_code=True``): when
    the directory is a CodeQuant checkpoint, the file's sha256 must be the one recorded in config.json."""
    directory = Path(directory)
    try:
        qc = json.loads((directory / CONFIG_NAME).read_text()).get("quantization_config")
    except (OSError, ValueError):
        return  # not a local model directory with a readable config: not a CodeQuant checkpoint
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return
    try:
        verify_checksums([directory / module_file], qc.get("checksums") or {})
    except CheckpointError as err:
        raise CheckpointError(f"{err}; it was not executed (trust_remote_code)") from None


def check_file_tensors(
    headers: dict[str, tuple[Path, dict]],
    modules: dict[str, dict],
    expected_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> None:
    """Check the tensors listed in safetensors headers against the module specs.

    ``headers`` maps tensor name -> (file, header entry). Packed tensors must be present with
    the exact format dtype and the shape the spec implies; biases and RMSNorm weights must be
    float. With ``expected_shapes`` (the state dict of the model skeleton) every stored tensor's
    shape is checked too.
    """
    for name, spec in modules.items():
        wanted = expected_packed_tensors(spec)
        wanted.update((suffix, (shape, None)) for suffix, shape in module_kind(spec["kind"]).float_tensors(spec).items())
        for suffix, (shape, dtype) in wanted.items():
            key = f"{name}.{suffix}" if name else suffix
            if key not in headers:
                raise CheckpointError(f"codequant checkpoint: tensor {key} is missing from the weight files")
            path, entry = headers[key]
            if dtype is not None and entry["dtype"] != dtype:
                raise CheckpointError(
                    f"codequant checkpoint {path}: tensor {key} has dtype {entry['dtype']}, "
                    f"expected {dtype} (format v{FORMAT_VERSION})"
                )
            if dtype is None and entry["dtype"] not in FLOAT_DTYPES:
                raise CheckpointError(f"codequant checkpoint {path}: tensor {key} has dtype {entry['dtype']}, expected a float dtype")
            if tuple(entry["shape"]) != shape:
                raise CheckpointError(
                    f"codequant checkpoint {path}: tensor {key} has shape {list(entry['shape'])}, expected {list(shape)}"
                )
    for key, (path, entry) in headers.items():
        if expected_shapes is not None and key in expected_shapes:
            shape = tuple(expected_shapes[key][0])
            if tuple(entry["shape"]) != shape:
                raise CheckpointError(
                    f"codequant checkpoint {path}: tensor {key} has shape {list(entry['shape'])}, the model expects {list(shape)}"
                )


def _flat(spec: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_bound_specs(bound: dict[Path, dict], qc: dict) -> None:
    """The format version, summary and module specs bound into each weight file's header must
    equal config.json's: a config that was edited, lost a spec or gained one is refused."""
    modules, held = qc["modules"], set()
    for f, metadata in bound.items():
        version = metadata.get("format_version")
        if metadata.get("quant_method") != QUANT_METHOD or version != str(FORMAT_VERSION) or "codequant_specs" not in metadata:
            raise CheckpointError(
                f"codequant checkpoint {f}: the file's header does not bind format version {FORMAT_VERSION} module specs "
                f"(its format_version is {version!r}); quantize the model again with this codequant"
            )
        restore = "config.json was edited after export; restore it from the exported checkpoint"
        summary = json.loads(metadata["codequant_summary"])
        for key in SUMMARY_KEYS:
            if summary.get(key) != qc[key]:
                raise CheckpointError(
                    f"codequant checkpoint {f.parent}: config.json has quantization_config.{key} = {qc[key]!r}, "
                    f"the weights in {f.name} were written with {summary.get(key)!r}; {restore}"
                )
        for name, spec in json.loads(metadata["codequant_specs"]).items():
            if name not in modules:
                raise CheckpointError(
                    f"codequant checkpoint {f.parent}: module {name} has packed tensors in {f.name} but no spec in "
                    f"config.json's quantization_config.modules; {restore}"
                )
            ours, theirs = _flat(modules[name]), _flat(spec)
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    raise CheckpointError(
                        f"codequant checkpoint {f.parent}: module {name} has {key} = {ours.get(key)!r} in config.json, "
                        f"its tensors in {f.name} were written with {key} = {theirs.get(key)!r}; {restore}"
                    )
            held.add(name)
    for name in modules:
        if name not in held:
            raise CheckpointError(
                f"codequant checkpoint: module {name} has a spec in config.json but no weight file holds its tensors; "
                "restore the weight files and config.json from the exported checkpoint"
            )


def verify_checkpoint_files(
    directory: str | os.PathLike, qc: dict, files: list[str | os.PathLike] | None = None, *, checksums: bool = True
) -> dict[str, tuple[Path, dict]]:
    """Every check of a checkpoint's files against its ``quantization_config`` ``qc``, before any
    tensor is read; every loader (transformers' quantizer, :func:`verify_checkpoint`, other
    engines) calls this one function.

    Truncation; the sha256 of every file read or executed at load (weight files, weight index,
    codequant_remote.py); the format version, summary and module specs bound into the weight
    files' headers equal config.json's; every packed tensor is claimed by a spec and every spec's
    tensors are present with the format's dtypes and shapes. Returns {tensor name: (file, header entry)}.
    """
    directory = Path(directory)
    files = weight_files(directory) if files is None else [Path(f) for f in files]
    headers, bound = {}, {}
    for f in files:
        tensors, bound[f] = read_safetensors_header(f)
        headers.update((key, (f, entry)) for key, entry in tensors.items())
    if checksums:
        others = [directory / n for n in (INDEX_FILE, REMOTE_CODE_FILE) if (directory / n).is_file() or n in qc["checksums"]]
        verify_checksums(files + others, qc["checksums"])
    check_bound_specs(bound, qc)
    for key, (f, _) in headers.items():
        if key.rpartition(".")[2] in packed_suffixes() and module_of(key, qc["modules"]) is None:
            raise CheckpointError(
                f"codequant checkpoint {f}: tensor {key} is packed CodeQuant data that no module spec in config.json claims; "
                "restore config.json from the exported checkpoint"
            )
    check_file_tensors(headers, qc["modules"])
    return headers


def check_packed_values(key: str, weight: PackedWeight) -> None:
    """Zero padding past column K, and row_sum == sum_k W_hat (per leading slice), on the in-memory
    layout. (Indices stored at b bits cannot exceed 2^b - 1: the format has no room for them.)"""
    idx = weight.indices
    k = weight.in_features
    r = k % 64
    if r and idx.numel():
        last = idx[..., -32:]
        offsets = torch.arange(32, device=idx.device)
        bad = (((last & 0xF) != 0) & (offsets >= r)) | (((last >> 4) != 0) & (offsets + 32 >= r))
        if bool(bad.any()):
            raise CheckpointError(f"codequant checkpoint: {key}indices has nonzero padding indices past column {k}")
    rows = weight.indices.shape[:-1]
    flat = PackedWeight(idx.reshape(-1, idx.shape[-1]), weight.codebook.reshape(-1, *weight.codebook.shape[-2:]),
                        weight.row_sum.reshape(-1), k)
    step = max(1, 2**24 // max(k, 1))
    worst = 0.0
    for s in range(0, flat.indices.shape[0], step):
        part = PackedWeight(flat.indices[s:s + step], flat.codebook[s:s + step], flat.row_sum[s:s + step], k)
        w = part.dequantize(torch.float32)
        err = (w.sum(-1) - part.row_sum.float()).abs()
        tol = 1e-4 * w.abs().sum(-1) + 1e-5
        if not bool(torch.all(err <= tol)):  # also catches NaN
            worst = max(worst, float(torch.nan_to_num(err - tol, nan=float("inf")).max()))
    if worst > 0:
        raise CheckpointError(
            f"codequant checkpoint: {key}row_sum does not match its codebooks and indices "
            f"(off by up to {worst:.3g} over {tuple(rows)} rows); the file is corrupted"
        )


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or index)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise CheckpointError(f"codequant checkpoint {directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_quantization_config(directory: str | os.PathLike) -> dict:
    """The validated ``quantization_config`` dict of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"codequant checkpoint {directory}: no {CONFIG_NAME}")
    qc = json.loads(path.read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"codequant checkpoint {directory}: config.json has no codequant quantization_config")
    return check_quantization_config(qc)


def refuse_packed_without_config(directory: str | os.PathLike) -> None:
    """Refuse a local model directory whose config.json has no CodeQuant ``quantization_config``
    but whose weight files were written by CodeQuant: loaded as a plain model, its packed
    tensors would be ignored and the layers they replace left randomly initialized."""
    directory = Path(directory)
    config = directory / CONFIG_NAME
    if not config.is_file() or json.loads(config.read_text()).get("quantization_config"):
        return
    try:
        files = weight_files(directory)
    except CheckpointError:
        return
    for f in files:
        if read_safetensors_header(f)[1].get("quant_method") == QUANT_METHOD:
            raise CheckpointError(
                f"codequant checkpoint {directory}: config.json has no quantization_config, but {f.name} holds CodeQuant "
                "packed tensors that a plain model would ignore (running on random weights); restore config.json from the export"
            )


def collect_headers(files: list[Path]) -> dict[str, tuple[Path, dict]]:
    headers = {}
    for f in files:
        tensors, _ = read_safetensors_header(f)
        for key, entry in tensors.items():
            headers[key] = (f, entry)
    return headers


def verify_checkpoint(directory: str | os.PathLike, checksums: bool = True) -> dict:
    """Every check ``from_pretrained`` runs, without building the model; returns the quantization_config.

    Structure (truncation), checksums, dtypes and shapes of the packed tensors, padding and row
    sums. Raises :class:`CheckpointError` with a message naming the problem.
    """
    from safetensors import safe_open

    qc = read_quantization_config(directory)
    headers = verify_checkpoint_files(directory, qc, checksums=checksums)
    handles = {}
    try:
        for name, spec in qc["modules"].items():
            for prefix, (_, k, _) in packed_layout(spec).items():
                base = f"{name}.{prefix}"
                parts = []
                for part in PACKED_PARTS:
                    f = headers[base + part][0]
                    if f not in handles:
                        handles[f] = safe_open(str(f), framework="pt")
                    parts.append(unpack_from_disk(base + part, handles[f].get_tensor(base + part), spec["bits"]))
                check_packed_values(base, PackedWeight(*parts, k))
    finally:
        handles.clear()
    return qc


def checkpoint_summary(directory: str | os.PathLike) -> dict:
    """Sizes of a checkpoint: file bytes and bits per weight (codebooks and row sums included).

    ``bits_per_weight`` is the bytes the packed tensors take in the weight files over the packed
    weights (it equals :func:`codequant.core.format.bits_per_weight`);
    ``bits_per_parameter`` divides all weight-file bits by every stored or packed parameter.
    Reads only headers and config.json.
    """
    directory = Path(directory)
    qc = read_quantization_config(directory)
    files = weight_files(directory)
    headers = collect_headers(files)
    packed_bytes = packed_n = 0
    packed_keys = set()
    for name, spec in qc["modules"].items():
        for prefix, (rows, k, _) in packed_layout(spec).items():
            keys = [f"{name}.{prefix}{p}" for p in PACKED_PARTS]
            packed_bytes += sum(headers[key][1]["data_offsets"][1] - headers[key][1]["data_offsets"][0] for key in keys)
            packed_n += math.prod(rows) * k
            packed_keys.update(keys)
    other_params = sum(math.prod(e["shape"]) for key, (_, e) in headers.items() if key not in packed_keys)
    weight_bytes = sum(f.stat().st_size for f in files)
    total_bytes = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    kinds = Counter(spec["kind"] for spec in qc["modules"].values())
    return {
        "path": str(directory),
        "format_version": qc["format_version"],
        "bits": qc["bits"],
        "group_size": qc["group_size"],
        "act_bits": qc["act_bits"],
        "files": [f.name for f in files],
        "weight_file_bytes": weight_bytes,
        "total_bytes": total_bytes,
        "packed_weights": int(packed_n),
        "other_parameters": int(other_params),
        "bits_per_weight": 8 * packed_bytes / packed_n if packed_n else float("nan"),
        "bits_per_parameter": 8.0 * weight_bytes / (packed_n + other_params) if packed_n + other_params else float("nan"),
        "modules": dict(kinds),
        "extra": qc.get("extra", {}),
    }
