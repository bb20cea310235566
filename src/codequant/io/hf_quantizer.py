"""transformers integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` on a CodeQuant checkpoint.

Importing this module (``import codequant`` does) registers

* :class:`CodeQuantConfig` for ``quantization_config.quant_method == "codequant"``,
* :class:`CodeQuantHfQuantizer`, which, before the weights are read, checks the checkpoint's
  files (:func:`codequant.io.checkpoint.verify_checkpoint_files`: truncation, checksums, the
  specs bound into the weight files against config.json, dtypes and shapes) and puts an empty
  module of each listed spec's kind in place (:mod:`codequant.modules.registry`; a router keeps
  its routing logic), its packed buffers shaped as the tensors are stored; a tensor
  the model expects that the files lack (it would be randomly initialized), or one the files
  hold that the model has no place for, is refused. transformers then loads the tensors; after
  loading it unpacks them to the in-memory layout (:func:`codequant.core.format.unpack_from_disk`),
  checks padding and row sums and finishes the routers (weight = W_hat), then fuses every
  softmax top-k router (:func:`codequant.modules.router.fuse_routers`: one CUDA launch per
  layer for decode batches) and, on CUDA, the q/k/v projections of each attention block
  (:func:`codequant.modules.attention.fuse_qkv`: one packed linear, one launch), and
* a check before transformers runs a ``trust_remote_code`` module file of a CodeQuant
  checkpoint (``codequant_remote.py``): its sha256 must match config.json's checksum. A process
  that has not imported codequant yet runs the file once before any codequant code can check
  it; the model load that follows is refused by the checksum checks above.

A checkpoint is only written by :func:`codequant.io.save_quantized`; ``save_pretrained`` on a
loaded CodeQuant model is refused (the packed modules and checksums need the CodeQuant writer).
"""

from __future__ import annotations

import copy
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
from ..modules.attention import fuse_qkv
from ..modules.registry import install_from_spec, module_kind
from ..modules.router import fuse_routers
from .checkpoint import check_file_tensors, check_packed_values, verify_checkpoint_files, verify_remote_code
from .schema import (
    FIELDS,
    PACKED_PARTS,
    QUANT_METHOD,
    CheckpointError,
    check_quantization_config,
    expected_packed_tensors,
    packed_layout,
    torch_dtype,
)

logger = logging.getLogger(__name__)

# CODEQUANT_VERIFY_CHECKSUMS=0 skips hashing the weight files at load (the other checks still run)
VERIFY_ENV = "CODEQUANT_VERIFY_CHECKSUMS"


class CodeQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a CodeQuant checkpoint (schema: :mod:`codequant.io.checkpoint`,
    checked by :func:`codequant.io.schema.check_quantization_config`)."""

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
        given = dict(quant_method=quant_method, format_version=format_version, codequant_version=codequant_version,
                     bits=bits, group_size=group_size, act_bits=act_bits, act_group_size=act_group_size, modules=modules,
                     rms_norms=rms_norms, checksums=checksums, extra=extra)
        for key, value in check_quantization_config(given | unknown).items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return copy.deepcopy({key: getattr(self, key) for key in FIELDS})

    def __iter__(self):
        yield from self.to_dict().items()


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None else torch.get_default_dtype()


def prepare_model_for_checkpoint(model: torch.nn.Module, modules: dict[str, dict]) -> None:
    """Put empty modules of the specs' kinds in place (:meth:`QuantizedModule.from_spec`); their packed
    buffers take the disk layout that transformers loads into (see :func:`finish_loaded_model`)."""
    dtype = _float_dtype(model)
    arch = type(model).__name__
    for name, spec in modules.items():
        try:
            module = install_from_spec(model, name, spec, dtype)
        except AttributeError:
            raise CheckpointError(f"codequant checkpoint: module {name} listed in quantization_config is not in the {arch} model") from None
        except ValueError as err:
            raise CheckpointError(f"codequant checkpoint: {spec['kind']} {name} of the {arch} model: {err}") from None
        device = next(itertools.chain(module.buffers(), module.parameters())).device
        for suffix, (shape, st) in expected_packed_tensors(spec).items():
            module.register_buffer(suffix, torch.zeros(shape, dtype=torch_dtype(st), device=device))


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
    rebuilt = {f"{name}.{t}" for name, spec in modules.items() for t in module_kind(spec["kind"]).rebuilt_tensors}
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
    """Bring the loaded packed tensors to the in-memory layout, check them, and let each module
    finish loading (routers compute W_hat)."""
    for name, spec in modules.items():
        module = model.get_submodule(name)
        for prefix, (_, k, _) in packed_layout(spec).items():
            parts = []
            for p in PACKED_PARTS:
                module.register_buffer(prefix + p, unpack_from_disk(prefix + p, getattr(module, prefix + p), spec["bits"]))
                parts.append(getattr(module, prefix + p))
            check_packed_values(f"{name}.{prefix}", PackedWeight(*parts, k))
        module.finish_loading()


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
        # tensors rebuilt from the packed ones (quantized routers' weights), not stored
        ignore = {re.escape(f"{name}.{t}") + "$" for name, s in qc.modules.items() for t in module_kind(s["kind"]).rebuilt_tensors}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | ignore
        model.config.codequant_rms_norms = list(qc.rms_norms)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_loaded_model(model, self.quantization_config.modules)
        fuse_routers(model)
        fuse_qkv(model)
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
