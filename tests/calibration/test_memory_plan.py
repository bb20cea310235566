"""Bounded device memory in quantize: the plan, the up-front refusal, chunked experts equal unchunked."""

from __future__ import annotations

import copy

import pytest
import torch

from codequant.calibration.pipeline import quantize
from codequant.calibration.resources import GIB, plan_memory
from codequant.config import QuantConfig
from codequant.evaluation.perplexity import evaluate
from tests.helpers.tiny_models import tiny_input_ids, tiny_model

FAST = dict(nsamples=8, seqlen=32, rotation_steps=10, accf_epochs=1, accf_batch_tokens=64, kmeans_iters=8, device="cpu")


def _floor_gib(model) -> float:
    layers = model.model.layers
    return plan_memory(list(layers), lambda layer: getattr(layer.mlp, "experts", None), max(64, 8 * 32), None).min_bytes / GIB


def test_too_small_max_gpu_memory_is_refused_up_front_with_the_minimum():
    model = tiny_model("qwen3_moe")
    layer = model.model.layers[0]
    experts = layer.mlp.experts
    params = sum(p.numel() for p in layer.parameters()) * 4
    one_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4
    widest = 128  # the tiny model's widest row: gate_up's 2 x 64 outputs
    need = (params + experts.down_proj.numel() * 4 + 8 * one_expert + 24 * 256 * widest * 4) / GIB
    with pytest.raises(ValueError) as err:
        quantize(model, QuantConfig(max_gpu_memory=0.001, **FAST), progress=False, calibration=tiny_input_ids(8, 32, 1))
    assert str(err.value) == (
        f"--max-gpu-memory 0.001 GiB is too small: decoder layer 0 needs at least {need:.2f} GiB (its float32 weights, "
        f"one expert and one batch of 256 tokens); give --max-gpu-memory {need:.2f} or more"
    )


def test_max_gpu_memory_must_be_positive():
    with pytest.raises(ValueError, match="--max-gpu-memory must be a positive number of GiB, got -1"):
        QuantConfig(max_gpu_memory=-1)


def test_budget_sets_the_expert_chunk():
    model = tiny_model("qwen3_moe")
    layers = list(model.model.layers)
    floor = plan_memory(layers, lambda layer: layer.mlp.experts, 256, None).min_bytes
    experts = layers[0].mlp.experts
    one_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4
    assert plan_memory(layers, lambda layer: layer.mlp.experts, 256, floor / GIB).expert_chunk == 1
    assert plan_memory(layers, lambda layer: layer.mlp.experts, 256, (floor + 3 * 8 * one_expert) / GIB).expert_chunk == 3
    assert plan_memory(layers, lambda layer: layer.mlp.experts, 256, None).expert_chunk >= experts.gate_up_proj.shape[0]


@pytest.mark.parametrize("method", ["codequant", "gptq"])
def test_one_expert_at_a_time_gives_the_same_model(method):
    """A budget at the minimum (k-means, GPTQ, reassignment and packing one expert at a time)
    gives the model of the unbounded run: equal logits."""
    fp = tiny_model("qwen3_moe")
    calib = tiny_input_ids(8, 32, 1)
    free = quantize(copy.deepcopy(fp), QuantConfig(method=method, **FAST), progress=False, calibration=calib)
    tight = quantize(copy.deepcopy(fp), QuantConfig(method=method, max_gpu_memory=_floor_gib(fp) + 1e-6, **FAST), progress=False, calibration=calib)
    ids = tiny_input_ids(2, 32, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(tight.model(ids).logits, free.model(ids).logits, rtol=1e-4, atol=1e-4)
    layer = tight.model.model.layers[0].mlp.experts
    assert torch.equal(layer.gate_up_indices, free.model.model.layers[0].mlp.experts.gate_up_indices)


def test_report_gives_time_and_peak_memory_per_stage():
    fp = tiny_model("qwen3_moe")
    result = quantize(copy.deepcopy(fp), QuantConfig(**FAST), progress=False, calibration=tiny_input_ids(8, 32, 1))
    stages = result.report["seconds_per_stage"]
    assert {"transforms (norm folding, rotations)", "attention", "mlp", "propagate"} <= set(stages)
    assert all(s >= 0 for s in stages.values())
    assert result.report["peak_host_rss_gib"] > 0
    assert evaluate(result.model, tiny_input_ids(2, 32, seed=7), fp, progress=False)["kl"] < 1.0


@pytest.mark.parametrize("method", ["codequant", "gptq"])
def test_layer_calibration_records_no_autograd_graph_outside_accf(monkeypatch, method):
    """Statistics, k-means, GPTQ and packing run without autograd: nothing of a layer's calibration
    is saved for a backward pass except by ACCF's training steps (here none: accf_epochs = 0).
    A graph through the experts' weights once kept every expert's routed inputs and every k-means
    temporary alive until the layer ended, about ten times the layer's size on the device."""
    from torch.autograd.graph import saved_tensors_hooks

    from codequant.calibration.driver import Quantizer

    saved = []
    calibrate = Quantizer.quantize_layer

    def recorded(self, *args):
        with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            return calibrate(self, *args)

    monkeypatch.setattr(Quantizer, "quantize_layer", recorded)
    model = tiny_model("qwen3_moe")
    with torch.enable_grad():
        quantize(model, QuantConfig(method=method, **{**FAST, "accf_epochs": 0}), progress=False, calibration=tiny_input_ids(8, 32, 1))
    assert saved == []
