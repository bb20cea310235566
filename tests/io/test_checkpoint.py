"""Deployable checkpoints: round trip for every supported architecture, and corrupted files refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import codequant
from codequant.core.format import FORMAT_VERSION, PackedWeight, bits_per_weight
from codequant.io import CheckpointError, atomic_directory, checkpoint_summary, save_quantized, verify_checkpoint
from codequant.io.checkpoint import sha256_file
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.modules.norm import RMSNorm
from codequant.modules.router import CodeQuantRouter

from tests.helpers.packed import quantize_tiny, uniform_codebook
from tests.helpers.tiny_models import SUPPORTED_TINY, tiny_input_ids, tiny_model

pytestmark = pytest.mark.usefixtures("reference_kernels")  # these tests are about storage: every module on the reference path


def load(path) -> nn.Module:
    # tiny_models run eager attention; the attention kernel is a runtime choice, not stored
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One quantized qwen3_moe checkpoint shared by the corruption tests (each copies it)."""
    model = quantize_tiny(tiny_model("qwen3_moe"))
    path = tmp_path_factory.mktemp("ckpt") / "qwen3_moe"
    save_quantized(model, path, extra={"method": "test", "rotations": ["R1"]})
    return model, path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_tensors(path: Path, edit) -> None:
    """Apply ``edit(tensors)`` to model.safetensors and record the new checksum (a consistent but wrong writer)."""
    tensors = load_file(path / "model.safetensors")
    with safe_open(path / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata=metadata)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["checksums"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_round_trip_logits_equal(arch, tmp_path):
    torch.manual_seed(0)
    model = quantize_tiny(tiny_model(arch), lm_head=arch in ("qwen3", "llama"))
    ids = tiny_input_ids(batch=1, seq=8)
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tmp_path / arch)
    loaded = load(tmp_path / arch)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
    kinds = {name: type(m) for name, m in loaded.named_modules()}
    for name, m in model.named_modules():
        if isinstance(m, (CodeQuantLinear, CodeQuantExperts, RMSNorm)):
            assert kinds[name] is type(m), name
        if isinstance(m, CodeQuantRouter):
            r = loaded.get_submodule(name)
            assert isinstance(r, CodeQuantRouter) and r.act == m.act
            assert torch.equal(r.weight, m.weight)
    for name, m in loaded.named_modules():
        if isinstance(m, CodeQuantLinear):
            src = model.get_submodule(name)
            assert (m.act, m.hadamard_block, m.group_size) == (src.act, src.hadamard_block, src.group_size)
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_tied_float_lm_head_stays_tied(tmp_path):
    model = quantize_tiny(tiny_model("qwen3"))  # lm_head stays float, tied to the embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_quantized(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    loaded = load(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = tiny_input_ids(batch=1, seq=8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_quantization_config_schema(saved):
    model, path = saved
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "codequant" and qc["format_version"] == FORMAT_VERSION
    assert (qc["bits"], qc["group_size"], qc["act_bits"], qc["act_group_size"]) == (4, 32, 4, 32)
    assert qc["extra"] == {"method": "test", "rotations": ["R1"]}
    assert qc["checksums"] == {name: sha256_file(path / name) for name in ("model.safetensors", "codequant_remote.py")}
    spec = qc["modules"]["model.layers.0.mlp.experts"]
    assert spec == {
        "kind": "experts", "num_experts": 8, "hidden_dim": 64, "intermediate_dim": 64, "group_size": 32,
        "down_group_size": 64, "bits": 4, "act": {"bits": 4, "group_size": 32, "clip": 0.9},
        "down_act": {"bits": 4, "group_size": 0, "clip": 1.0}, "hadamard_block": 32, "activation": "silu",
    }
    assert qc["modules"]["model.layers.1.self_attn.o_proj"]["hadamard_block"] == 16
    assert qc["modules"]["model.layers.1.mlp.gate"]["kind"] == "router"
    stored = load_file(path / "model.safetensors")
    assert "model.layers.1.mlp.gate.weight" not in stored  # rebuilt from the codebook at load
    assert stored["model.layers.1.mlp.gate.indices"].dtype == torch.uint8
    assert stored["model.layers.0.self_attn.q_proj.codebook"].dtype == torch.float16
    assert not (path.parent / ".qwen3_moe.tmp").exists() and sorted(p.name for p in path.parent.iterdir()) == ["qwen3_moe"]


def test_summary_bits_per_weight(saved):
    model, path = saved
    summary = checkpoint_summary(path)
    weights = [m.packed for m in model.modules() if isinstance(m, CodeQuantLinear)]
    for m in model.modules():
        if isinstance(m, CodeQuantExperts):
            weights += [m.gate_up, m.down]
        if isinstance(m, CodeQuantRouter):
            weights.append(m.packed)
    n = [w.indices.shape[:-1].numel() * w.in_features for w in weights]
    expected = sum(bits_per_weight(w, 4) * k for w, k in zip(weights, n)) / sum(n)
    assert summary["packed_weights"] == sum(n)
    assert math.isclose(summary["bits_per_weight"], expected, rel_tol=1e-12)
    assert 4.0 < summary["bits_per_weight"] < 16.0
    assert summary["weight_file_bytes"] == (path / "model.safetensors").stat().st_size
    assert summary["modules"] == {"linear": 8, "experts": 2, "router": 2}


def test_atomic_directory_replaces_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        assert d.parent == tmp_path / "out.partial"  # staged inside OUT.partial, never beside OUT
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "out.partial").mkdir()  # a quantize run's resume state: kept, the run removes it
    with atomic_directory(target) as d:
        (d / "b").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]
    assert sorted(p.name for p in target.iterdir()) == ["b"] and not any((tmp_path / "out.partial").iterdir())


def test_sharded_checkpoint_loads(saved, tmp_path):
    model, _ = saved
    save_quantized(model, tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = tiny_input_ids(batch=1, seq=8)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "sharded")(ids).logits, model(ids).logits)
    verify_checkpoint(tmp_path / "sharded")


def test_extra_must_be_json(saved, tmp_path):
    model, _ = saved
    with pytest.raises(ValueError, match="extra must be JSON-serializable"):
        save_quantized(model, tmp_path / "x", extra={"rotation": torch.eye(2)})
    assert not (tmp_path / "x").exists()


def test_plain_model_refused(tmp_path):
    with pytest.raises(ValueError, match="no CodeQuant modules"):
        save_quantized(tiny_model("llama"), tmp_path / "plain")


# --- corruption: each refused with a clear message, by from_pretrained and by verify_checkpoint


def test_truncated_file_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    for check in (load, verify_checkpoint):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: file is truncated \(\d+ bytes, its header describes \d+\)"):
            check(path)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="file is truncated .* its header alone needs"):
        load(path)


def test_checksum_mismatch_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last tensor's data
    f.write_bytes(bytes(data))
    for check in (load, verify_checkpoint):
        with pytest.raises(CheckpointError, match="sha256 checksum mismatch .* the file is corrupted or was modified after export"):
            check(path)


def test_wrong_dtype_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    key = "model.layers.0.self_attn.q_proj.codebook"
    rewrite_tensors(path, lambda t: t.__setitem__(key, t[key].float()))
    for check in (load, verify_checkpoint):
        with pytest.raises(CheckpointError, match=rf"tensor {key} has dtype F32, expected F16 \(format v{FORMAT_VERSION}\)"):
            check(path)


def test_wrong_shape_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    key = "model.layers.1.mlp.experts.down_row_sum"
    rewrite_tensors(path, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[8, 63\], expected \[8, 64\]"):
        load(path)


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_indices_and_codebooks_are_stored_at_their_width(bits, tmp_path):
    """b-bit indices take b/4 of the bytes of 4-bit ones and codebooks keep their 2^b entries; the
    loaded model holds exactly the in-memory tensors it was saved from."""
    model = quantize_tiny(tiny_model("mixtral"), bits=bits)
    save_quantized(model, tmp_path / "low", bits=bits)
    save_quantized(model, tmp_path / "four", bits=4)  # the same indices, stored as nibbles
    low, four = load_file(tmp_path / "low" / "model.safetensors"), load_file(tmp_path / "four" / "model.safetensors")
    key = "model.layers.1.mlp.experts.gate_up_"
    assert low[key + "indices"].shape[-1] * 4 == four[key + "indices"].shape[-1] * bits
    assert low[key + "codebook"].shape[-1] == 2**bits and four[key + "codebook"].shape[-1] == 16
    assert json.loads((tmp_path / "low" / "config.json").read_text())["quantization_config"]["bits"] == bits
    verify_checkpoint(tmp_path / "low")
    loaded = load(tmp_path / "low")
    expected = model.state_dict()
    for name, t in loaded.state_dict().items():
        if name.endswith(("indices", "codebook", "row_sum")):
            assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
    ids = tiny_input_ids(batch=1, seq=8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    summary, summary4 = checkpoint_summary(tmp_path / "low"), checkpoint_summary(tmp_path / "four")
    assert summary["weight_file_bytes"] < summary4["weight_file_bytes"]
    weights = [w for m in model.modules() if isinstance(m, CodeQuantExperts) for w in (m.gate_up, m.down)]
    weights += [m.packed for m in model.modules() if isinstance(m, CodeQuantLinear)]
    weights += [m.packed for m in model.modules() if isinstance(m, CodeQuantRouter)]
    n = [w.indices.shape[:-1].numel() * w.in_features for w in weights]
    for s, b in ((summary, bits), (summary4, 4)):
        assert math.isclose(s["bits_per_weight"], sum(bits_per_weight(w, b) * k for w, k in zip(weights, n)) / sum(n), rel_tol=1e-12)


def test_nonzero_padding_refused():
    # the tiny models have K a multiple of 64 (no padding): check a 96-column weight directly
    lin = CodeQuantLinear.from_packed(uniform_codebook(torch.randn(8, 96), 4, 32))
    indices = lin.indices.clone()
    indices[2, 40] |= 0xF0  # byte 8 of block 1: its high nibble is column 64 + 32 + 8 = 104 >= 96, padding
    with pytest.raises(CheckpointError, match="has nonzero padding indices past column 96"):
        from codequant.io.checkpoint import check_packed_values

        check_packed_values("x.", PackedWeight(indices, lin.codebook, lin.row_sum, 96))


def test_row_sum_mismatch_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    key = "model.layers.0.self_attn.k_proj.row_sum"
    rewrite_tensors(path, lambda t: t[key].__setitem__(3, t[key][3] + 1.0))
    with pytest.raises(CheckpointError, match=r"k_proj\.row_sum does not match its codebooks and indices .* the file is corrupted"):
        load(path)


@pytest.mark.parametrize("version,advice", [(FORMAT_VERSION + 1, "upgrade codequant"), (2, "quantize the model again with this codequant"),
                                            (0, "quantize the model again with this codequant")])
def test_format_version_mismatch_refused(saved, tmp_path, version, advice):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = version
    (path / "config.json").write_text(json.dumps(config))
    message = rf"codequant checkpoint: format version {version} is not supported by this codequant \(supports {FORMAT_VERSION}\); {advice}"
    for check in (load, verify_checkpoint):
        with pytest.raises(CheckpointError, match=message):
            check(path)


def test_unknown_config_key_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["bitz"] = 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown quantization_config keys \['bitz'\]"):
        load(path)


def test_spec_without_tensors_refused(saved, tmp_path):
    path = copy_checkpoint(saved[1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    modules["model.layers.5.self_attn.q_proj"] = modules["model.layers.0.self_attn.q_proj"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="module model.layers.5.self_attn.q_proj has a spec in config.json but no weight file holds its tensors"):
        load(path)


def test_verify_checkpoint_accepts_valid(saved):
    qc = verify_checkpoint(saved[1])
    assert qc["format_version"] == FORMAT_VERSION and codequant.FORMAT_VERSION == FORMAT_VERSION
