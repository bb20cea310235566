"""The weight-quantizer and R1 registries: the statistics each quantizer declares are the ones
the driver collects, and a method added by one registry line is the one ``quantize`` runs."""

from __future__ import annotations

import pytest
import torch

from codequant.calibration.pipeline import quantize
from codequant.calibration.rotations import R1_ROTATIONS
from codequant.config import METHODS, QuantConfig, Recipe
from codequant.modules.linear import CodeQuantLinear
from codequant.quantizers.registry import WEIGHT_QUANTIZERS
from codequant.quantizers.weight_quantizer import WeightQuantizer
from tests.helpers.tiny_models import tiny_input_ids, tiny_model

FAST = dict(nsamples=4, seqlen=16, rotation_steps=2, accf_epochs=1, accf_batch_tokens=32, kmeans_iters=2, device="cpu")


def _recording(name: str, monkeypatch) -> list:
    """Wrap the registered quantizer ``name`` so that each fit records the statistics it was given."""
    seen, original = [], WEIGHT_QUANTIZERS[name]

    def fit(weight, stats, config, group_size):
        seen.append((weight.shape, stats))
        return original.fit(weight, stats, config, group_size)

    monkeypatch.setitem(WEIGHT_QUANTIZERS, name, WeightQuantizer(fit, original.statistics))
    return seen


@pytest.mark.parametrize(
    "method, options, hessian",
    [("rtn", {}, False), ("gptq", {}, True), ("kmeans", {}, False), ("kmeans", {"weight_assignment": "feedback"}, True)],
)
def test_the_driver_collects_the_statistics_the_quantizer_declares(method, options, hessian, monkeypatch):
    config = QuantConfig(method=method, **options, **FAST)
    quantizer = WEIGHT_QUANTIZERS[config.recipe.weights]
    assert ("hessian" in quantizer.statistics(config)) is hessian
    seen = _recording(config.recipe.weights, monkeypatch)
    quantize(tiny_model("qwen3_moe"), config, progress=False, calibration=tiny_input_ids(4, 16, 1))
    assert seen, "the method's registered quantizer never ran"
    for shape, stats in seen:
        assert stats.a.shape == stats.b.shape == (*shape[:-2], shape[-1])
        if hessian:
            assert stats.hessian.shape == (*shape[:-2], shape[-1], shape[-1])
        else:
            assert stats.hessian is None


def _row_mean(weight, stats, config, group_size):
    """Toy quantizer: every centroid of a row group is the group's mean (idx all zero)."""
    k = weight.shape[-1]
    groups = weight.reshape(*weight.shape[:-1], k // group_size, group_size)
    codebook = groups.mean(-1, keepdim=True).expand(*groups.shape[:-1], 2**config.wbits).contiguous()
    return torch.zeros(weight.shape, dtype=torch.long, device=weight.device), codebook


def test_a_weight_quantizer_registered_by_one_line_is_the_one_quantize_runs(monkeypatch):
    monkeypatch.setitem(WEIGHT_QUANTIZERS, "row_mean", WeightQuantizer(_row_mean, lambda config: frozenset()))
    monkeypatch.setitem(METHODS, "row_mean", Recipe("none", "row_mean", False, False))
    result = quantize(tiny_model("qwen3_moe"), QuantConfig(method="row_mean", **FAST), progress=False, calibration=tiny_input_ids(4, 16, 1))
    q = result.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, CodeQuantLinear)
    assert not q.indices.any()  # every index 0, as the toy assigned
    assert torch.equal(q.codebook.amin(-1), q.codebook.amax(-1)) and q.codebook.float().abs().sum() > 0


def test_an_r1_registered_by_one_line_is_the_one_quantize_applies(monkeypatch):
    made = []

    def identity_r1(q, tokens):
        made.append(tokens.shape)
        return torch.eye(q.adapter.hidden_size(q.model))

    monkeypatch.setitem(R1_ROTATIONS, "identity", identity_r1)
    monkeypatch.setitem(METHODS, "identity_rtn", Recipe("identity", "rtn", False, False))
    result = quantize(tiny_model("qwen3_moe"), QuantConfig(method="identity_rtn", **FAST), progress=False, calibration=tiny_input_ids(4, 16, 1))
    assert made == [(4, 16)]
    assert result.model.model.layers[0].mlp.experts.hadamard_block > 0  # a rotated method gets the online Hadamard


@pytest.mark.parametrize("recipe, message", [
    (Recipe("none", "lattice", False, False), "unknown weight quantizer 'lattice' (known: ['rtn', 'gptq', 'codebook'])"),
    (Recipe("cayley", "rtn", False, False), "unknown R1 rotation 'cayley' (known: ['none', 'hadamard', 'learned'])"),
])
def test_an_unregistered_stage_is_refused_before_any_work(recipe, message, monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "typo", recipe)
    with pytest.raises(ValueError) as e:  # before the (missing) model is read or the output is checked
        quantize(str(tmp_path / "no-model"), QuantConfig(method="typo", **FAST), tmp_path / "out", progress=False)
    assert str(e.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_unknown_method_is_refused_by_the_config():
    with pytest.raises(ValueError) as e:
        QuantConfig(method="qat")
    assert str(e.value) == "unknown method 'qat'; choose one of: rtn, quarot, spinquant, gptq, kmeans, codequant"
