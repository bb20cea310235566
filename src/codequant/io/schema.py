"""The ``quantization_config`` schema of a CodeQuant checkpoint (documented in :mod:`codequant.io.checkpoint`).

Field names and defaults, the format-version check, module-spec validation (the keys of each
kind come from its module class, :mod:`codequant.modules.registry`), the packed tensors a spec
implies on disk, and the one conversion of "whole row" group sizes: module specs store G = K,
the top-level ``group_size`` summary stores 0.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..core.activations import ActQuantSpec
from ..core.format import CODEBOOK_DTYPE, FORMAT_VERSION, check_group_size, stored_index_bytes
from ..modules import registry

QUANT_METHOD = "codequant"
PACKED_PARTS = ("indices", "codebook", "row_sum")
SUMMARY_KEYS = ("bits", "group_size", "act_bits", "act_group_size")
# the top-level fields in their order, with the default of each
FIELDS = {
    "quant_method": QUANT_METHOD,
    "format_version": FORMAT_VERSION,
    "codequant_version": None,
    "bits": 4,
    "group_size": 0,
    "act_bits": 16,
    "act_group_size": 0,
    "modules": None,
    "rms_norms": None,
    "checksums": None,
    "extra": None,
}

# safetensors dtype names
_ST_DTYPES = {
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL",
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# the exact dtype of each packed tensor
PACKED_DTYPES = {"indices": _ST_DTYPES[torch.uint8], "codebook": _ST_DTYPES[CODEBOOK_DTYPE], "row_sum": "F32"}


class CheckpointError(ValueError):
    """A CodeQuant checkpoint is malformed, corrupted, or from an unsupported format version."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return next(dtype for dtype, st in _ST_DTYPES.items() if st == name)


def packed_suffixes() -> tuple[str, ...]:
    """The names (relative to their module) packed tensors of any registered kind may have."""
    prefixes = {p for kind in registry.module_kinds() for p in registry.module_kind(kind).packed_parts}
    return tuple(prefix + part for prefix in sorted(prefixes) for part in PACKED_PARTS)


def act_from_dict(d: dict) -> ActQuantSpec:
    unknown = set(d) - {f.name for f in dataclasses.fields(ActQuantSpec)}
    if unknown:
        raise CheckpointError(f"codequant checkpoint: unknown activation spec keys {sorted(unknown)}")
    return ActQuantSpec(**d)


def packed_layout(spec: dict) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """{tensor prefix: (leading dims + (N,), K, G)} of the packed weights a module spec describes."""
    return registry.module_kind(spec["kind"]).packed_layout(spec)


def expected_packed_tensors(spec: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor suffix: (shape, safetensors dtype)} of the packed tensors of one module spec, as stored on disk."""
    out = {}
    for prefix, (rows, k, g) in packed_layout(spec).items():
        out[prefix + "indices"] = (rows + (stored_index_bytes(k, spec["bits"]),), PACKED_DTYPES["indices"])
        out[prefix + "codebook"] = (rows + (k // g, 2 ** spec["bits"]), PACKED_DTYPES["codebook"])
        out[prefix + "row_sum"] = (rows, PACKED_DTYPES["row_sum"])
    return out


def summary(specs: dict[str, dict]) -> dict:
    """The top-level summary fields (except ``bits``) of a checkpoint's module specs: the most common
    group size of grouped codebooks (0 when every codebook covers a whole row), the smallest
    activation bit width (16: none quantized) and the most common activation group size at it."""
    groups, acts = Counter(), []
    for spec in specs.values():
        for _, k, g in packed_layout(spec).values():
            if g < k:
                groups[g] += 1
        acts += [spec[key] for key in ("act", "down_act") if key in spec]
    act_bits = min((a["bits"] for a in acts), default=16)
    act_groups = Counter(a["group_size"] for a in acts if a["bits"] == act_bits)
    return {
        "group_size": groups.most_common(1)[0][0] if groups else 0,
        "act_bits": act_bits,
        "act_group_size": act_groups.most_common(1)[0][0] if act_groups else 0,
    }


def version_error(version) -> CheckpointError:
    if isinstance(version, int) and version > FORMAT_VERSION:
        advice = "upgrade codequant"
    else:
        advice = "quantize the model again with this codequant"
    return CheckpointError(
        f"codequant checkpoint: format version {version} is not supported by this codequant "
        f"(supports {FORMAT_VERSION}); {advice}"
    )


def check_module_spec(name: str, spec: dict) -> None:
    """Refuse a module spec of an unknown kind, with missing or unknown keys, or with values
    no module can hold (bits, group size, Hadamard block, activations, the kind's own rules)."""
    kind = spec.get("kind")
    if kind not in registry.module_kinds():
        raise CheckpointError(f"codequant checkpoint: module {name} has unknown kind {kind!r} (known: {list(registry.module_kinds())})")
    cls = registry.module_kind(kind)
    if set(spec) != cls.spec_keys:
        missing, unknown = cls.spec_keys - set(spec), set(spec) - cls.spec_keys
        raise CheckpointError(
            f"codequant checkpoint: module {name} ({kind}) has missing keys {sorted(missing)} / unknown keys {sorted(unknown)}"
        )
    if "bits" in spec and not 1 <= spec["bits"] <= 4:
        raise CheckpointError(f"codequant checkpoint: module {name} has bits {spec['bits']}, expected 1..4")
    for _, k, g in packed_layout(spec).values():
        try:
            if not isinstance(g, int) or g == 0:  # module specs spell a whole row G = K, never 0
                raise ValueError
            check_group_size(g, k)
        except ValueError:
            raise CheckpointError(f"codequant checkpoint: module {name} has group size {g}, which does not divide {k}") from None
    hb = spec.get("hadamard_block", 0)
    if hb and (hb & (hb - 1)):
        raise CheckpointError(f"codequant checkpoint: module {name} has hadamard_block {hb}, not a power of two")
    problem = cls.spec_problem(spec)
    if problem:
        raise CheckpointError(f"codequant checkpoint: module {name} has {problem}")
    for key in ("act", "down_act"):
        if key in spec:
            act_from_dict(spec[key])


def check_quantization_config(qc: dict) -> dict:
    """The validated ``quantization_config`` (defaults filled in, numbers as int); raises
    :class:`CheckpointError` naming the first problem. A format version other than
    ``codequant.core.format.FORMAT_VERSION`` is refused, unknown keys are errors."""
    unknown = set(qc) - set(FIELDS)
    out = FIELDS | {key: value for key, value in qc.items() if key in FIELDS}
    version = out["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(
            f"codequant checkpoint: quantization_config.format_version must be an integer, got "
            f"{type(version).__name__} {version!r}; write it as a number, without quotes"
        )
    if version != FORMAT_VERSION:
        raise version_error(version)
    if out["quant_method"] != QUANT_METHOD:
        raise CheckpointError(f"codequant checkpoint: quant_method is {out['quant_method']!r}, expected {QUANT_METHOD!r}")
    if unknown:
        raise CheckpointError(f"codequant checkpoint: unknown quantization_config keys {sorted(unknown)}")
    for key in SUMMARY_KEYS:
        out[key] = int(out[key])
    out["modules"] = {name: dict(spec) for name, spec in (out["modules"] or {}).items()}
    out["rms_norms"] = list(out["rms_norms"] or [])
    out["checksums"] = dict(out["checksums"] or {})
    out["extra"] = dict(out["extra"] or {})
    if not 1 <= out["bits"] <= 4:
        raise CheckpointError(f"codequant checkpoint: bits must be 1..4, got {out['bits']}")
    for name, spec in out["modules"].items():
        check_module_spec(name, spec)
    return out
