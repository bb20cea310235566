"""The CodeQuant entry point: load, resume, quantize layer by layer, save.

    model -> fold norms -> R1 (random Hadamard, or AOS-trained) -> [R2] -> POG
          -> for each layer i (on the chosen device, the rest on the CPU):
               attention linears: codebooks (or RTN / GPTQ) [+ ACCF on output MSE]
               MLP / MoE block:   router, experts, shared experts [+ ACCF on block MSE + router KL]
               X_{i+1} = quantized_layer_i(X_i)   (calibrate, then propagate)
          -> packed checkpoint

The stages live in: :mod:`.loading` (model, device), :mod:`.data` (calibration tokens),
:mod:`.driver` (the layer loop, global transforms), :mod:`.rotations` (R1), :mod:`.statistics`,
:mod:`.weights` (weight quantizers, linears), :mod:`.moe_block` (the MoE block calibrator) and
:mod:`.layer_store` (installing packed modules, per-layer resume files).

With ``stream``, a model given as a directory or hub id is streamed (:mod:`.streaming`): each decoder layer is
read from disk when its turn comes, folded and rotated on its own, and (with an output
directory) freed once its packed tensors are saved; the learned R1 takes two passes over the
layers (collect activations, then quantize). The result equals the in-memory path's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..core.format import bits_per_weight
from ..modules.registry import quantized_modules
from ..io.output import check_output, partial_dir, run_record, start_or_resume
from ..quantizers.registry import weight_quantizer
from .data import calibration_tokens
from .driver import Quantizer
from .layers import cast_float_params
from .loading import load_model, open_model, resolve_device
from .resources import StageClock, cap_device_memory
from .rotations import r1_rotation

log = logging.getLogger("codequant")


@dataclass
class QuantResult:
    model: nn.Module | None  # None when a streamed run freed its layers into ``out_dir``: load the checkpoint
    tokenizer: object
    report: dict = field(default_factory=dict)


def model_bits_per_weight(model: nn.Module, bits: int) -> float:
    """Bits per quantized weight on disk at ``bits``-bit indices, over every packed module
    (codebooks and row constants included; what :func:`codequant.io.checkpoint_summary` reads back)."""
    total, count = 0.0, 0
    for module in quantized_modules(model).values():
        for w in module.packed_weights().values():
            n = w.indices.shape[:-1].numel() * w.in_features
            total, count = total + bits_per_weight(w, bits) * n, count + n
    return total / max(count, 1)


def quantize(
    model: str | nn.Module,
    config: QuantConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    tokenizer=None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
) -> QuantResult:
    """Quantize ``model`` (a hub id, a local directory, or a loaded model with ``tokenizer``)
    by ``config``; with ``out_dir``, write the packed checkpoint there (resumable; an existing
    checkpoint there is replaced only with ``overwrite``, see :mod:`codequant.io.output`).
    ``calibration`` [nsamples, seqlen] tokens replace the config's data source."""
    config = config or QuantConfig()
    r1_rotation(config.recipe.rotation)  # the method's stages are registered: checked before any work
    weight_quantizer(config.recipe.weights)
    start = time.time()
    clock = StageClock()
    source = model if isinstance(model, str) else None
    if out_dir is not None:  # before any work: nothing the user owns is overwritten, a resume matches its run
        check_output(out_dir, source, overwrite)
        record = run_record(source, json.loads(config.fingerprint()), config.calib)
        start_or_resume(partial_dir(out_dir), record, create=False)
    dtype = torch.float32 if resolve_device(config.device).type == "cpu" else torch.bfloat16
    streamed = None
    if isinstance(model, str):
        with clock.stage("load"):
            model, tokenizer, streamed = open_model(model, dtype, config.stream)
    out = Path(out_dir) if out_dir is not None else None
    q = Quantizer(model, config, out, progress, clock, streamed)
    log.info("memory plan: %d experts per chunk, %d tokens per batch, about %.2f GiB of device memory per layer",
             q.plan.expert_chunk, q.plan.token_batch, q.plan.need_bytes / 2**30)
    cap_device_memory(q.device, config.max_gpu_memory)
    q.check_group_sizes()
    q.check_expert_activations()
    if q.partial is not None:
        start_or_resume(q.partial, record)
    cache = q.partial / "calibration_tokens.safetensors" if q.partial else None
    if streamed is None:
        model.to("cpu")
    if calibration is not None:
        tokens, data_source = calibration, "calibration tokens given by the caller"
    else:
        with clock.stage("calibration data"):
            tokens, data_source = calibration_tokens(lambda: _full_model(model, source, dtype, streamed), tokenizer, config, cache, source)
    log.info("calibration data: %s (%d x %d tokens)", data_source, *tokens.shape)
    rotary = q.adapter.rotary_emb(model).to(q.device)
    with clock.stage("transforms (norm folding, rotations)"):
        q.transform(tokens)
    q.run(tokens)
    rotary.to("cpu")
    report = _report(q, data_source)
    if out is not None:
        with clock.stage("save"):
            _save(q, tokenizer, out, data_source, source)
        _remove_tree(q.partial)
        report["out_dir"] = str(out)
    report["seconds"] = round(time.time() - start, 1)
    report.update(clock.report())
    return QuantResult(None if q.free_done else model, tokenizer, report)


def _report(q: Quantizer, data_source: str) -> dict:
    """The run's report: method, bit widths, calibration source, bits per weight, unreached experts, ACCF and block-tuning losses,
    the clip ratios ``act_clip_search`` chose (module name: ratio)."""
    config = q.config
    return {
        "method": config.method,
        "wbits": config.wbits,
        "abits": config.abits,
        "group_size": config.group_size,
        "calibration": data_source,
        "bits_per_weight": round(model_bits_per_weight(q.model, config.wbits), 4),
        "unreached_experts": q.report["unreached_experts"],
        "accf_loss_per_epoch": q.report["accf"],
        "block_tuning_loss_per_epoch": q.report["block_tuning"],
        "act_clip": q.report["act_clip"],
    }


def _save(q: Quantizer, tokenizer, out: Path, data_source: str, source: str | None) -> None:
    """The packed checkpoint in ``out``, in the source model's dtype; a streamed run's freed
    layers are read back from their ``OUT.partial`` files."""
    from ..io.checkpoint import save_quantized

    model, config = q.model, q.config
    extra = {"method": config.method, "config": config.to_dict(), "calibration": data_source, "source_model": source,
             "rotations": {"r1": config.recipe.rotation, "r2": config.value_rotation, "online_hadamard": list(q.online_hadamard)}}
    save_dtype = getattr(model, "codequant_source_dtype", None) or torch.float32
    cast_float_params(model, save_dtype)
    saved = {q.adapter.layer_name(i): (lambda i=i: q.store.saved_layer_tensors(i, save_dtype)) for i in range(len(q.adapter.layers(model)))} if q.free_done else None
    save_quantized(model, out, tokenizer, extra, bits=config.wbits, saved_elsewhere=saved)


def _full_model(model: nn.Module, source: str | None, dtype: torch.dtype, streamed) -> nn.Module:
    """The whole full-precision model (to sample calibration text from): ``model`` itself, or for a
    streamed run a complete copy loaded for the purpose (freed after sampling)."""
    if streamed is None:
        return model
    log.warning("sampling calibration text needs the whole model in host memory; give --calib to keep a streamed run within a few layers")
    return load_model(source, dtype)[0]


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
