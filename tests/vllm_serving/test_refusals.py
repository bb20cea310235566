"""vLLM's load path refuses what the codequant method cannot serve faithfully, before any engine starts.

Corrupted or mismatched checkpoints get the same error as ``from_pretrained``; valid checkpoints
whose vLLM output is not verified (another architecture, codebooks other than 4 bits) get a
refusal that names what is verified and what to use instead.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")

from safetensors.torch import save_file  # noqa: E402

from tests.helpers.packed import quantize_tiny  # noqa: E402
from tests.helpers.tiny_models import tiny_model  # noqa: E402
from tests.vllm_serving.checkpoints import make_checkpoint  # noqa: E402

from codequant.io import CheckpointError, load_quantized, save_quantized  # noqa: E402


def vllm_error(path) -> str:
    """The message vLLM raises while opening ``path`` (config errors arrive as pydantic's ValueError)."""
    from vllm import LLM

    with pytest.raises(ValueError) as err:
        LLM(str(path), dtype="float32", enforce_eager=True, max_model_len=256, skip_tokenizer_init=True)
    return str(err.value)


def from_pretrained_error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_quantized(path, dtype=torch.float32)
    return str(err.value)


def assert_same_refusal(path, expected: str) -> None:
    message = from_pretrained_error(path)
    assert expected in message
    assert message in vllm_error(path)


def edit_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("w4a4") / "ckpt", 4)


@pytest.fixture
def copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "ckpt")


def test_truncated_weight_file(copy):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_same_refusal(copy, "file is truncated")


def test_wrong_format_version(copy):
    edit_config(copy, lambda c: c["quantization_config"].update(format_version=99))
    assert_same_refusal(copy, "format version 99 is not supported")


def test_tampered_module_spec(copy):
    def edit(config):
        spec = config["quantization_config"]["modules"]["model.layers.0.self_attn.o_proj"]
        spec["act"]["bits"] = 8

    edit_config(copy, edit)
    assert_same_refusal(copy, "model.layers.0.self_attn.o_proj")


def test_other_safetensors_file_is_refused(copy):
    """``codequant quantize`` keeps its calibration tokens beside the weights; vLLM would load them as weights."""
    save_file({"tokens": torch.zeros(2, 8, dtype=torch.int64)}, str(copy / "calibration_tokens.safetensors"))
    message = vllm_error(copy)
    assert "vLLM would load ['calibration_tokens.safetensors'] as model weights" in message
    assert "move them out of the checkpoint directory" in message


def test_unverified_index_width_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "w3", 4, bits=3)
    message = vllm_error(ckpt)
    assert "use 3-bit indices" in message and "only 4-bit checkpoints are verified" in message
    assert "codequant generate" in message and "--wbits 4" in message


def test_unverified_architecture_is_refused(tmp_path):
    model = quantize_tiny(tiny_model("phimoe"))
    ckpt = save_quantized(model, tmp_path / "phimoe")
    message = vllm_error(ckpt)
    assert "['PhimoeForCausalLM'] is not verified" in message
    assert "verified: Qwen3MoeForCausalLM, MixtralForCausalLM" in message and "codequant generate" in message


def test_deepseek_v2_latent_other_than_512_plus_64_is_refused(tmp_path):
    """vLLM's CPU MLA decode kernel runs one latent size; vLLM itself fails later with 'Head dimension 80 is not
    supported by MLA' (or, at 256 + 64, 'Unsupported block size: 16')."""
    ckpt = save_quantized(quantize_tiny(tiny_model("deepseek_v2")), tmp_path / "deepseek_v2")
    message = vllm_error(ckpt)
    assert "caches kv_lora_rank 64 + qk_rope_head_dim 16 channels per token" in message
    assert "CPU MLA decode kernel runs only 576 (512 + 64, DeepSeek-V2's)" in message and "codequant generate" in message


def test_hub_name_is_refused(checkpoint):
    """Only a local directory can be verified before loading (vLLM would fetch a Hub name's files later)."""
    from codequant.vllm.method import CodeQuantVllmConfig

    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    with pytest.raises(CheckpointError, match="not a local directory.*huggingface-cli download someone/model"):
        CodeQuantVllmConfig.from_config(qc).maybe_update_config("someone/model")
