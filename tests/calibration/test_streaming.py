"""Weights streamed from disk: same checkpoint as the in-memory path, resume; every expert
calibrated from all tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import codequant  # noqa: F401  (registers the checkpoint loader)
from codequant.calibration import driver
from codequant.calibration.pipeline import quantize
from codequant.config import QuantConfig
from codequant.io.checkpoint import read_quantization_config, weight_files
from codequant.quantizers import kmeans
from tests.helpers.paths import FIXTURE
from tests.helpers.tiny_models import SUPPORTED_TINY, TINY_VARIANTS, tiny_input_ids, tiny_model

FAST = dict(nsamples=4, seqlen=16, rotation_steps=2, accf_epochs=1, accf_batch_tokens=32, kmeans_iters=2, device="cpu", value_rotation=True)
# the global stages that streaming splits per layer: learned R1 (two passes over the layers), R2
ROTATIONS = QuantConfig(method="spinquant", **FAST)
# and every per-layer stage: POG (groups), k-means, ACCF
CODEQUANT = QuantConfig(group_size=32, **FAST)


def _save(model, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(FIXTURE).save_pretrained(path)
    return str(path)


def _logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits


def _tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for f in weight_files(path) for k, v in load_file(f).items()}


def _no_stream(config: QuantConfig) -> QuantConfig:
    return QuantConfig(**{**config.to_dict(), "stream": False})


def _stream(config: QuantConfig) -> QuantConfig:
    return QuantConfig(**{**config.to_dict(), "stream": True})


@pytest.mark.parametrize("arch", SUPPORTED_TINY + TINY_VARIANTS)
def test_streamed_checkpoint_equals_the_in_memory_one(arch, tmp_path):
    source = _save(tiny_model(arch), tmp_path / "src")
    calib = tiny_input_ids(4, 16, 1)
    quantize(source, _no_stream(ROTATIONS), tmp_path / "mem", progress=False, calibration=calib)
    streamed = quantize(source, _stream(ROTATIONS), tmp_path / "stream", progress=False, calibration=calib)
    assert streamed.model is None  # its layers were freed into the checkpoint
    assert len(weight_files(tmp_path / "stream")) == 3  # one file outside the layers, one per layer
    mem, new = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert mem.keys() == new.keys()
    assert [k for k in mem if not torch.equal(mem[k], new[k]) or mem[k].dtype != new[k].dtype] == []
    specs = [read_quantization_config(tmp_path / d) for d in ("mem", "stream")]
    for qc in specs:
        del qc["checksums"], qc["extra"]["config"]["stream"]
    assert specs[0] == specs[1]


def test_streamed_quantized_lm_head_equals_the_in_memory_one(tmp_path):
    source = _save(tiny_model("qwen3_moe"), tmp_path / "src")
    calib = tiny_input_ids(4, 16, 1)
    config = QuantConfig(**{**CODEQUANT.to_dict(), "targets": [*CODEQUANT.targets, "lm_head"]})
    quantize(source, _no_stream(config), tmp_path / "mem", progress=False, calibration=calib)
    quantize(source, _stream(config), tmp_path / "stream", progress=False, calibration=calib)
    mem, new = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert {"lm_head.indices", "lm_head.codebook"} <= mem.keys() and "lm_head.weight" not in mem
    assert mem.keys() == new.keys()
    assert [k for k in mem if not torch.equal(mem[k], new[k])] == []


def test_streamed_run_resumes_after_interruption_and_equals_the_in_memory_run(tmp_path, monkeypatch):
    source = _save(tiny_model("qwen3_moe"), tmp_path / "src")
    calib = tiny_input_ids(4, 16, 1)
    config = _stream(CODEQUANT)
    quantize(source, _no_stream(config), tmp_path / "full", progress=False, calibration=calib)
    original = driver.Quantizer.quantize_layer

    def crash_on_second_layer(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return original(self, i, *args)

    monkeypatch.setattr(driver.Quantizer, "quantize_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        quantize(source, config, tmp_path / "resumed", progress=False, calibration=calib)
    assert (tmp_path / "resumed.partial" / "layer_0000.safetensors").is_file()
    monkeypatch.setattr(driver.Quantizer, "quantize_layer", original)
    quantize(source, config, tmp_path / "resumed", progress=False, calibration=calib)
    assert not (tmp_path / "resumed.partial").exists()
    ids = tiny_input_ids(2, 16, seed=3)
    assert torch.equal(_logits(tmp_path / "resumed", ids), _logits(tmp_path / "full", ids))


# -- host memory bounded by a layer, not the model -----------------------------------------------
PEAK_RSS = """
import sys, torch
from codequant import QuantConfig, quantize
from codequant.calibration.resources import host_rss_peak_gib
tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
quantize(sys.argv[1], QuantConfig(method="rtn", device="cpu", nsamples=2, seqlen=32, stream=True), sys.argv[2], progress=False, calibration=tokens)
print(host_rss_peak_gib() * 2**30)
"""


def _wide_qwen3_moe(layers: int, path: Path) -> int:
    """A Qwen3-MoE of ``layers`` layers whose experts dominate (about 56 MB of bf16 a layer),
    saved in bf16; returns the bytes of one decoder layer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=2048, intermediate_size=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    _save(model, path)
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def test_streamed_peak_host_memory_grows_by_less_than_a_layer_with_depth(tmp_path):
    """Peak RSS (VmHWM of a child process) of a streamed 8-layer quantization exceeds the
    2-layer one by less than one decoder layer: layers are read, quantized, written and freed."""
    import subprocess
    import sys

    peaks = {}
    for layers in (2, 8):
        layer_bytes = _wide_qwen3_moe(layers, tmp_path / f"src{layers}")
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / f"src{layers}"), str(tmp_path / f"out{layers}")],
                             capture_output=True, text=True, check=True)
        peaks[layers] = float(run.stdout.split()[-1])
        assert len(weight_files(tmp_path / f"out{layers}")) == layers + 1
    assert peaks[8] - peaks[2] < layer_bytes, (peaks, layer_bytes)


# -- every expert calibrated ------------------------------------------------------------------
def _never_route_to_expert_0(model):
    """A router hook that takes expert 0 out of every token's top-k (as a router that never picks it)."""

    def hook(router, args, out):
        logits = out[0].clone()
        logits[:, 0] = float("-inf")
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        return out[0], (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("all_experts", [True, False])
def test_unreached_expert_gets_its_codebook_from_calibration_statistics(all_experts, monkeypatch):
    """The k-means weights (E[x_k^2]) of an expert the router never picks come from every
    calibration token by default, the data-free all-ones fallback only without it; reached
    experts keep the statistics of their routed tokens."""
    seen = []
    fit = kmeans.fit_codebooks

    def record(weight, bits, group, importance, *args):
        if weight.dim() == 3 and weight.shape[-1] == 64 and weight.shape[-2] == 128:  # experts' gate_up [E, 2I, H]
            seen.append(importance.clone())
        return fit(weight, bits, group, importance, *args)

    monkeypatch.setattr(kmeans, "fit_codebooks", record)
    model = _never_route_to_expert_0(tiny_model("qwen3_moe"))
    config = QuantConfig(method="kmeans", calibrate_all_experts=all_experts, **FAST)
    result = quantize(model, config, progress=False, calibration=tiny_input_ids(4, 16, 1))
    assert result.report["unreached_experts"] == {"model.layers.0.mlp.experts": [0], "model.layers.1.mlp.experts": [0]}
    assert len(seen) == 2
    for importance in seen:
        if all_experts:  # expert 0 sees every token, expert 1 only those routed to it
            assert not torch.allclose(importance[0], torch.ones_like(importance[0]))
            assert not torch.allclose(importance[0], importance[1])
        else:
            assert torch.equal(importance[0], torch.ones_like(importance[0]))
            assert not torch.allclose(importance[1], torch.ones_like(importance[1]))

