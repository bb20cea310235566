"""Block-output tuning (src/codequant/calibration/layer_tuning.py): it lowers the layer-output
error it optimizes, keeps the checkpoint format, and its options are checked."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from codequant.calibration.driver import Quantizer
from codequant.calibration.layer_tuning import tune_layer
from codequant.calibration.layers import LayerRunner, on_device
from codequant.calibration.pipeline import quantize
from codequant.config import QuantConfig
from tests.helpers.tiny_models import tiny_input_ids, tiny_model

FAST = dict(nsamples=8, seqlen=32, rotation_steps=10, accf_epochs=1, accf_batch_tokens=64, kmeans_iters=8, device="cpu")
TUNED_VS_UNTUNED = 0.9  # layer-output error after block tuning / before, on the calibration stream


def _layer_error(out: torch.Tensor, y_ref: torch.Tensor, x: torch.Tensor) -> float:
    """The objective's output term: ||layer_hat(x) - layer(x)||^2 / ||layer(x) - x||^2."""
    return float((out - y_ref).pow(2).mean() / (y_ref - x).pow(2).mean())


@pytest.mark.parametrize("abits", [16, 4])
def test_block_tuning_lowers_the_packed_layer_output_error(abits):
    """Layer 0 quantized (attention, router, experts; ACCF), installed packed: its output error
    against the full-precision layer, run on the deployed modules, before and after tuning."""
    config = QuantConfig(abits=abits, **FAST)
    q = Quantizer(copy.deepcopy(tiny_model("qwen3_moe", seed=0)), config, None, progress=False)
    tokens = tiny_input_ids(8, 32, seed=1)
    q.transform(tokens)
    x = q.embed(tokens)
    run = LayerRunner(q.model, q.adapter, q.device)
    layer = q.open_layer(0, rotated=True)
    with on_device(layer, q.device):
        y_ref = run(0, layer, x)
        books = q.quantize_targets(0, layer, x, run)
        assert {wb.target.kind for wb in books.values()} == {"linear", "router", "experts"}
        q.store.set_backend(layer, "reference")
        before = _layer_error(run(0, layer, x), y_ref, x)
        q.config.block_tuning_epochs = 4
        history = tune_layer(q, 0, layer, books, x, y_ref)
        q.store.set_backend(layer, "reference")
        after = _layer_error(run(0, layer, x), y_ref, x)
    assert len(history) == 5 and min(history[1:]) < history[0]
    assert after < TUNED_VS_UNTUNED * before, (before, after)


def _tensor_layout(path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_tuned_checkpoint_has_the_same_format_and_loads_to_the_same_logits(tmp_path, reference_kernels):
    from transformers import AutoModelForCausalLM

    fp = tiny_model("qwen3_moe", seed=0)
    plain = quantize(copy.deepcopy(fp), QuantConfig(**FAST), tmp_path / "plain", progress=False, calibration=tiny_input_ids(8, 32, seed=1))
    tuned = quantize(copy.deepcopy(fp), QuantConfig(block_tuning_epochs=2, **FAST), tmp_path / "tuned", progress=False, calibration=tiny_input_ids(8, 32, seed=1))
    histories = tuned.report["block_tuning_loss_per_epoch"]
    assert sorted(histories) == ["model.layers.0", "model.layers.1"] and not plain.report["block_tuning_loss_per_epoch"]
    # same tensors, shapes and dtypes (the packed format), but tuned centroids
    assert _tensor_layout(tmp_path / "tuned" / "model.safetensors") == _tensor_layout(tmp_path / "plain" / "model.safetensors")
    for a in ("plain", "tuned"):
        assert json.loads((tmp_path / a / "config.json").read_text())["quantization_config"]["quant_method"] == "codequant"
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as p, safe_open(str(tmp_path / "tuned" / "model.safetensors"), "pt") as t:
        for codebook in ("self_attn.q_proj.codebook", "mlp.gate.codebook", "mlp.experts.gate_up_codebook", "mlp.experts.down_codebook"):
            name = f"model.layers.0.{codebook}"
            assert not torch.equal(p.get_tensor(name), t.get_tensor(name)), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    ids = tiny_input_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tuned.model(ids).logits, rtol=0, atol=1e-5)


def test_block_tuning_changes_the_fingerprint():
    assert QuantConfig(block_tuning_epochs=2).fingerprint() != QuantConfig().fingerprint()
    assert QuantConfig(block_tuning_epochs=2, block_tuning_lr=1e-3).fingerprint() != QuantConfig(block_tuning_epochs=2).fingerprint()


@pytest.mark.parametrize("options,message", [
    ({"block_tuning_epochs": -1}, "--block-tuning-epochs must be 0 (off) or a positive number of epochs, got -1"),
    ({"block_tuning_lr": 0.0}, "block_tuning_lr must be a positive learning rate, got 0.0"),
    ({"block_tuning_epochs": 1.5}, "QuantConfig: option block_tuning_epochs must be an integer, got float 1.5"),
])
def test_bad_block_tuning_options_are_refused(options, message):
    with pytest.raises(ValueError) as e:
        QuantConfig(**options)
    assert str(e.value) == message
