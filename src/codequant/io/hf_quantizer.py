"""transformers integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` on a CodeQuant checkpoint.

Importing this module (``import codequant`` does) registers

* :class:`CodeQuantConfig` for ``quantization_config.quant_method == "codequant"``,
* :class:`CodeQuantHfQuantizer`, which, before the weights are read, checks the checkpoint's
  files (:func:`codequant.io.checkpoint.verify_checkpoint_files`: truncation, checksums, the
  specs bound into the weight files against config.json, dtypes and shapes) and swaps the
  modules listed in the config for empty CodeQuantLinear / CodeQuantExperts / RMSNorm modules
  and gives quantized routers their packed buffers, shaped as the tensors are stored; a tensor
  the model expects that the files lack (it would be randomly initialized), or one the files
  hold that the model has no place for, is refused. transformers then loads the tensors; after
  loading it unpacks them to the in-memory layout (:func:`codequant.core.format.unpack_from_disk`),
  checks padding and row sums and finishes the routers (weight = W_hat, input quantization
  pre-hook), and
* a check before transformers runs a ``trust_remote_code`` module file of a CodeQuant
  checkpoint (``codequant_remote.py``): its sha256 must match config.json's checksum. A process
  that has not imported codequant yet runs the file once before any codequant code can check
  it; the model load that follows is refused by the checksum checks above.

A checkpoint is only written by :func:`codequant.io.save_quantized`; ``save_pretrained`` on a
loaded CodeQuant model is refused (the packed modules and checksums need the CodeQuant writer).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
from pathlib import Path

import torch
from transformers import dynamic_module_utils
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.format import FORMAT_VERSION, PackedWeight, unpack_from_disk
from ..modules.experts import EXPERT_ACTIVATION, CodeQuantExperts
from ..modules.linear import CodeQuantLinear
from ..modules.norm import RMSNorm
from ..modules.router import quantize_router
from .checkpoint import (
    PACKED_PARTS,
    QUANT_METHOD,
    CheckpointError,
    act_from_dict,
    check_file_tensors,
    check_packed_values,
    expected_packed_tensors,
    packed_layout,
    torch_dtype,
    verify_checkpoint_files,
    verify_remote_code,
)

logger = logging.getLogger(__name__)

MODULE_KINDS = ("linear", "experts", "router", "rms_norm")
_MODULE_KEYS = {
    "linear": {"kind", "in_features", "out_features", "group_size", "bits", "act", "hadamard_block", "bias"},
    "experts": {"kind", "num_experts", "hidden_dim", "intermediate_dim", "group_size", "down_group_size", "bits", "act",
                "down_act", "hadamard_block", "activation"},
    "router": {"kind", "in_features", "out_features", "group_size", "bits", "act"},
    "rms_norm": {"kind", "hidden_size", "eps", "bias"},
}
# CODEQUANT_VERIFY_CHECKSUMS=0 skips hashing the weight files at load (the other checks still run)
VERIFY_ENV = "CODEQUANT_VERIFY_CHECKSUMS"


def _version_error(version) -> CheckpointError:
    if isinstance(version, int) and version > FORMAT_VERSION:
        advice = "upgrade codequant"
    else:
        advice = "quantize the model again with this codequant"
    return CheckpointError(
        f"codequant checkpoint: format version {version} is not supported by this codequant "
        f"(supports {FORMAT_VERSION}); {advice}"
    )


class CodeQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a CodeQuant checkpoint (schema: :mod:`codequant.io.checkpoint`).

    Unknown keys are errors; a format version other than ``codequant.core.format.FORMAT_VERSION`` is refused.
    """

    def __init__(
        self,
        quant_method: str = QUANT_METHOD,
        format_version: int = FORMAT_VERSION,
        bits: int = 4,
        group_size: int = 0,
        act_bits: int = 16,
        act_group_size: int = 0,
        modules: dict | None = None,
        rms_norms: list | None = None,
        checksums: dict | None = None,
        extra: dict | None = None,
        codequant_version: str | None = None,
        **unknown,
    ):
        if not isinstance(format_version, int) or isinstance(format_version, bool):
            raise CheckpointError(
                f"codequant checkpoint: quantization_config.format_version must be an integer, got "
                f"{type(format_version).__name__} {format_version!r}; write it as a number, without quotes"
            )
        if format_version != FORMAT_VERSION:
            raise _version_error(format_version)
        if quant_method != QUANT_METHOD:
            raise CheckpointError(f"codequant checkpoint: quant_method is {quant_method!r}, expected {QUANT_METHOD!r}")
        if unknown:
            raise CheckpointError(f"codequant checkpoint: unknown quantization_config keys {sorted(unknown)}")
        self.quant_method = quant_method
        self.format_version = format_version
        self.codequant_version = codequant_version
        self.bits, self.group_size = int(bits), int(group_size)
        self.act_bits, self.act_group_size = int(act_bits), int(act_group_size)
        self.modules = dict(modules or {})
        self.rms_norms = list(rms_norms or [])
        self.checksums = dict(checksums or {})
        self.extra = dict(extra or {})
        self._validate()

    def _validate(self) -> None:
        if not 1 <= self.bits <= 4:
            raise CheckpointError(f"codequant checkpoint: bits must be 1..4, got {self.bits}")
        for name, spec in self.modules.items():
            kind = spec.get("kind")
            if kind not in MODULE_KINDS:
                raise CheckpointError(f"codequant checkpoint: module {name} has unknown kind {kind!r} (known: {list(MODULE_KINDS)})")
            if set(spec) != _MODULE_KEYS[kind]:
                missing, unknown = _MODULE_KEYS[kind] - set(spec), set(spec) - _MODULE_KEYS[kind]
                raise CheckpointError(
                    f"codequant checkpoint: module {name} ({kind}) has missing keys {sorted(missing)} / unknown keys {sorted(unknown)}"
                )
            if "bits" in spec and not 1 <= spec["bits"] <= 4:
                raise CheckpointError(f"codequant checkpoint: module {name} has bits {spec['bits']}, expected 1..4")
            for _, k, g in packed_layout(spec).values():
                if not (isinstance(g, int) and 0 < g <= k and k % g == 0):
                    raise CheckpointError(f"codequant checkpoint: module {name} has group size {g}, which does not divide {k}")
            hb = spec.get("hadamard_block", 0)
            if hb and (hb & (hb - 1)):
                raise CheckpointError(f"codequant checkpoint: module {name} has hadamard_block {hb}, not a power of two")
            if kind == "experts" and spec["activation"] != EXPERT_ACTIVATION:
                raise CheckpointError(
                    f"codequant checkpoint: module {name} has expert activation {spec['activation']!r}, but the "
                    f"kernels compute {EXPERT_ACTIVATION!r} only; re-export the model with this codequant"
                )
            for key in ("act", "down_act"):
                if key in spec:
                    act_from_dict(spec[key])

    def to_dict(self) -> dict:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "codequant_version": self.codequant_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "act_bits": self.act_bits,
            "act_group_size": self.act_group_size,
            "modules": {k: dict(v) for k, v in self.modules.items()},
            "rms_norms": list(self.rms_norms),
            "checksums": dict(self.checksums),
            "extra": dict(self.extra),
        }

    def __iter__(self):
        yield from self.to_dict().items()



def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None else torch.get_default_dtype()


def build_empty_module(spec: dict, dtype: torch.dtype, device=None) -> torch.nn.Module:
    """An uninitialized module of the spec's kind and shapes (linear, experts, rms_norm)."""
    kind = spec["kind"]
    if kind == "linear":
        return CodeQuantLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["group_size"],
                               act_from_dict(spec["act"]), spec["hadamard_block"], dtype, device)
    if kind == "experts":
        return CodeQuantExperts(spec["num_experts"], spec["hidden_dim"], spec["intermediate_dim"], spec["group_size"],
                                spec["down_group_size"], act_from_dict(spec["act"]), act_from_dict(spec["down_act"]),
                                spec["hadamard_block"], device)
    if kind == "rms_norm":
        return RMSNorm(spec["hidden_size"], spec["eps"], dtype, device, bias=spec["bias"])
    raise ValueError(f"no empty module for kind {kind!r}")


def prepare_model_for_checkpoint(model: torch.nn.Module, modules: dict[str, dict]) -> None:
    """Swap in empty CodeQuant modules (and give routers packed buffers) as the specs describe; their
    packed buffers take the disk layout that transformers loads into (see :func:`finish_loaded_model`)."""
    dtype = _float_dtype(model)
    arch = type(model).__name__
    for name, spec in modules.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"codequant checkpoint: module {name} listed in quantization_config is not in the {arch} model") from None
        if spec["kind"] == "router":
            weight = getattr(current, "weight", None)
            if weight is None or tuple(weight.shape) != (spec["out_features"], spec["in_features"]):
                shape = None if weight is None else list(weight.shape)
                raise CheckpointError(
                    f"codequant checkpoint: router {name} of the {arch} model has weight shape {shape}, "
                    f"the checkpoint has [{spec['out_features']}, {spec['in_features']}]"
                )
        else:
            current = build_empty_module(spec, dtype)
            model.set_submodule(name, current)
        device = next(itertools.chain(current.buffers(), current.parameters())).device
        for suffix, (shape, st) in expected_packed_tensors(spec).items():
            current.register_buffer(suffix, torch.zeros(shape, dtype=torch_dtype(st), device=device))


def add_folded_biases(model: torch.nn.Module, names: list[str]) -> None:
    """Give the float linears that received a folded LayerNorm beta (PhiMoE) their bias slot."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device))


def check_state_keys(model: torch.nn.Module, headers: dict, modules: dict[str, dict]) -> None:
    """A CodeQuant checkpoint never loads partly random: every tensor of the prepared model must be
    in the weight files (except quantized routers' weights, rebuilt from their codebooks, and tied
    copies), and every stored tensor must have a place in the model."""
    expected = set(model.state_dict())
    rebuilt = {f"{name}.weight" for name, spec in modules.items() if spec["kind"] == "router"}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(expected - set(headers) - rebuilt - tied)
    unexpected = sorted(set(headers) - expected)
    if missing:
        raise CheckpointError(
            f"codequant checkpoint: the weight files lack {len(missing)} tensor(s) the model needs ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); they would be randomly initialized. Restore the checkpoint from its export"
        )
    if unexpected:
        raise CheckpointError(
            f"codequant checkpoint: the weight files hold {len(unexpected)} tensor(s) the model has no place for "
            f"({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}); config.json and the weights disagree. "
            "Restore the checkpoint from its export"
        )


def finish_loaded_model(model: torch.nn.Module, modules: dict[str, dict]) -> None:
    """Bring the loaded packed tensors to the in-memory layout, check them, and turn routers'
    buffers into working quantized routers."""
    for name, spec in modules.items():
        module = model.get_submodule(name)
        for prefix, (_, k, _) in packed_layout(spec).items():
            parts = []
            for p in PACKED_PARTS:
                module.register_buffer(prefix + p, unpack_from_disk(prefix + p, getattr(module, prefix + p), spec["bits"]))
                parts.append(getattr(module, prefix + p))
            check_packed_values(f"{name}.{prefix}", PackedWeight(*parts, k))
        if spec["kind"] == "router":
            weight = PackedWeight(*(module._buffers.pop(p) for p in PACKED_PARTS), spec["in_features"])
            quantize_router(module, weight, act_from_dict(spec["act"]))


def _verifying(get_cached_module_file):
    """transformers' fetch of a ``trust_remote_code`` module file, which first checks a CodeQuant
    checkpoint's file against its recorded checksum (:func:`codequant.io.checkpoint.verify_remote_code`)."""

    @functools.wraps(get_cached_module_file)
    def fetch(pretrained_model_name_or_path, module_file, *args, **kwargs):
        verify_remote_code(pretrained_model_name_or_path, module_file)
        return get_cached_module_file(pretrained_model_name_or_path, module_file, *args, **kwargs)

    fetch.codequant_verifying = True
    return fetch


# every module file transformers fetches from here on (AutoConfig / AutoModel* with trust_remote_code=True)
if not getattr(dynamic_module_utils.get_cached_module_file, "codequant_verifying", False):
    dynamic_module_utils.get_cached_module_file = _verifying(dynamic_module_utils.get_cached_module_file)


def _maybe_register(registry: dict, key: str, decorator):
    def wrap(cls):
        return cls if key in registry else decorator(cls)
    return wrap


CodeQuantConfig = _maybe_register(AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, register_quantization_config(QUANT_METHOD))(CodeQuantConfig)


@_maybe_register(AUTO_QUANTIZER_MAPPING, QUANT_METHOD, register_quantizer(QUANT_METHOD))
class CodeQuantHfQuantizer(HfQuantizer):
    """Loads pre-quantized CodeQuant checkpoints (quantizing on the fly is the pipeline's job)."""

    requires_calibration = True
    quantization_config: CodeQuantConfig

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("codequant checkpoints cannot be offloaded to disk")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = self.quantization_config
        files = [Path(f) for f in checkpoint_files or []]
        if not files:
            raise CheckpointError("codequant checkpoint: transformers found no weight files to load")
        headers = verify_checkpoint_files(files[0].parent, qc.to_dict(), files, checksums=os.environ.get(VERIFY_ENV, "1") != "0")
        prepare_model_for_checkpoint(model, qc.modules)
        add_folded_biases(model, getattr(model.config, "codequant_added_biases", None) or [])
        skeleton = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        check_file_tensors(headers, qc.modules, skeleton)
        check_state_keys(model, headers, qc.modules)
        # quantized routers' weights are rebuilt from their codebooks, not stored
        ignore = {re.escape(f"{name}.weight") + "$" for name, s in qc.modules.items() if s["kind"] == "router"}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | ignore
        model.config.codequant_rms_norms = list(qc.rms_norms)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_loaded_model(model, self.quantization_config.modules)
        return model

    def is_serializable(self):
        logger.warning("save a CodeQuant model with codequant.io.save_quantized, not save_pretrained")
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """Under torch.compile the quantized modules are the ops codequant::linear / codequant::moe,
        so ``generate(..., cache_implementation="static")`` compiles the decode step (CUDA graphs)."""
        return True
