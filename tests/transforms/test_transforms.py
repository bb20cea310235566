"""Stages 0-2 (norm folding, rotations, POG) keep every supported network's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codequant.adapters import get_adapter
from codequant.modules.norm import RMSNorm
from codequant.core.hadamard import random_hadamard
from codequant.transforms.norm_fold import fold_norms
from codequant.transforms.permutation import apply_pog, pog_permutation
from codequant.transforms.rotation import (
    _differentiable_quant_error,
    fold_online_hadamard,
    is_orthogonal,
    online_hadamard,
    quantization_error,
    rotate_residual,
    rotate_value_heads,
    train_rotation,
)
from tests.helpers.errors import max_rel_err
from tests.helpers.limits import LOGITS_EQUIVALENT
from tests.helpers.tiny_models import SUPPORTED_TINY, TINY_VARIANTS, tiny_input_ids, tiny_model

ALL_TINY = SUPPORTED_TINY + TINY_VARIANTS


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return (q * torch.sign(torch.diagonal(r))).float()


@pytest.mark.parametrize("arch", ALL_TINY)
def test_stages_keep_logits(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    ids = tiny_input_ids()
    ref = logits(model, ids)

    fold_norms(model, adapter)
    assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT
    for group in adapter.residual_readers(model):
        assert not isinstance(group.norm, nn.LayerNorm)
        assert torch.all(group.norm.weight == 1)

    rotate_residual(model, adapter, random_orthogonal(model.config.hidden_size, seed=1))
    assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT

    rotated = rotate_value_heads(model, adapter, seed=2)
    assert rotated == (0 if arch.startswith("deepseek_v2") else model.config.num_key_value_heads * 2)
    assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT

    permuted = apply_pog(model, adapter, group_size=8)
    assert permuted > 0
    assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT

    blocks = fold_online_hadamard(model, adapter)
    assert len(blocks) == sum(len(adapter.down_projections(layer)) for layer in adapter.layers(model))
    assert max_rel_err(logits(model, ids), ref) > 1e-2  # the fused weights need their run-time half
    with online_hadamard(model, blocks):
        assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT
        # after the fold, POG may only touch channels without an online Hadamard (value heads)
        heads_only = apply_pog(model, adapter, group_size=8, exclude=blocks)
        assert heads_only == (0 if arch.startswith("deepseek_v2") else model.config.num_key_value_heads * 2)
        assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT
    assert max_rel_err(logits(model, ids), ref) > 1e-2  # the context restored the plain modules


@pytest.mark.parametrize("arch", ["qwen3_moe", "phimoe", "deepseek_v2"])
def test_pog_alone_keeps_logits_and_changes_weights(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    ids = tiny_input_ids()
    ref = logits(model, ids)
    layer = adapter.layers(model)[-1]
    before = adapter.experts(layer).down_proj.detach().clone()
    n = apply_pog(model, adapter, group_size=16)
    assert n >= model.config.num_hidden_layers
    assert not torch.equal(before, adapter.experts(layer).down_proj)
    assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT
    assert apply_pog(model, adapter, group_size=1024) == 0  # no group smaller than any in_features


def test_fold_norms_phimoe_layer_norms_become_rms_norms():
    model = tiny_model("phimoe")
    adapter = get_adapter(model)
    fold_norms(model, adapter)
    names = model.config.codequant_rms_norms
    assert len(names) == 2 * model.config.num_hidden_layers + 1
    for name in names:
        assert isinstance(model.get_submodule(name), RMSNorm)
    # post-attention norms feed fused experts (no bias): they keep beta / gamma themselves
    assert model.config.codequant_rms_norm_biases == [f"model.layers.{i}.post_attention_layernorm" for i in range(2)]
    for name in model.config.codequant_rms_norm_biases:
        assert model.get_submodule(name).bias is not None
    # every writer of the residual stream is centred
    for w in adapter.residual_writers(model):
        assert w.tensor.mean(dim=w.stream_dim).abs().max() < 1e-5


def test_fold_norms_adds_reader_biases_where_missing():
    model = tiny_model("phimoe")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias = None
    model.lm_head.bias = None
    adapter = get_adapter(model)
    ids = tiny_input_ids()
    ref = logits(model, ids)
    fold_norms(model, adapter)
    assert model.config.codequant_added_biases == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert max_rel_err(logits(model, ids), ref) <= LOGITS_EQUIVALENT


def test_rotate_residual_needs_folded_norms_and_unties():
    model = tiny_model("qwen3")
    adapter = get_adapter(model)
    assert adapter.lm_head(model).weight is adapter.embed_tokens(model).weight
    with pytest.raises(ValueError, match="fold_norms"):
        rotate_residual(model, adapter, torch.eye(model.config.hidden_size))
    fold_norms(model, adapter)
    rotate_residual(model, adapter, random_orthogonal(model.config.hidden_size, seed=3))
    assert adapter.lm_head(model).weight is not adapter.embed_tokens(model).weight
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # transformers must not tie them again
    assert adapter.lm_head(model).weight is not adapter.embed_tokens(model).weight


def test_value_heads_not_rotated_when_clipped():
    model = tiny_model("olmoe")
    model.config.clip_qkv = 0.5
    adapter = get_adapter(model)
    v = adapter.attention(adapter.layers(model)[0]).v_proj.weight.detach().clone()
    assert rotate_value_heads(model, adapter) == 0
    assert torch.equal(v, adapter.attention(adapter.layers(model)[0]).v_proj.weight)


# -- POG -------------------------------------------------------------------------------
def test_pog_permutation_spreads_outlier_columns():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    outliers = [3, 4, 9, 20, 33, 34, 35, 60]
    w[:, outliers] *= 25
    perm = pog_permutation(w, group_size=16, block_size=2)
    assert sorted(perm.tolist()) == list(range(64))
    per_group = [sum(c in outliers for c in grp.tolist()) for grp in perm.view(4, 16)]
    assert per_group == [2, 2, 2, 2]  # natural order has 3, 1, 3, 1
    # each group opens with one of the 4 highest-spread blocks
    heads = {c for grp in perm.view(4, 16) for c in grp[:2].tolist()}
    assert heads == set(outliers)


def test_pog_permutation_rejects_bad_sizes():
    with pytest.raises(ValueError, match="^group size 24 does not divide the row length 64$"):
        pog_permutation(torch.randn(4, 64), group_size=24)
    with pytest.raises(ValueError):
        pog_permutation(torch.randn(4, 64), group_size=16, block_size=3)


# -- AOS -------------------------------------------------------------------------------
def heavy_tailed(tokens: int = 2048, hidden: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    x[:, [3, 17, 40]] *= 30  # a few outlier channels
    return x + 0.5 * torch.randn(tokens, 1, generator=g) * torch.randn(1, hidden, generator=g)


def test_differentiable_error_equals_reference_quantizer():
    x = heavy_tailed(256)
    assert torch.allclose(_differentiable_quant_error(x, 4), quantization_error(x, 4), rtol=1e-5)


def test_train_rotation_lowers_quantization_error():
    x = heavy_tailed()
    steps = []
    R = train_rotation(x, bits=4, steps=40, lr=2e-2, batch_size=256, seed=0, progress=lambda s, loss: steps.append(loss))
    assert len(steps) == 40
    assert R.dtype == torch.float32 and is_orthogonal(R, 1e-4)
    trained = float(quantization_error(x @ R))
    assert trained < 0.8 * float(quantization_error(x @ random_hadamard(64, 0)))
    assert trained < 0.2 * float(quantization_error(x))
    assert torch.equal(R, train_rotation(x, bits=4, steps=40, lr=2e-2, batch_size=256, seed=0))


def test_train_rotation_from_identity_learns():
    x = heavy_tailed(1024)
    R = train_rotation(x, steps=30, lr=2e-2, batch_size=256, init="identity")
    assert is_orthogonal(R, 1e-4)
    assert float(quantization_error(x @ R)) < 0.5 * float(quantization_error(x))
    with pytest.raises(ValueError):
        train_rotation(x, steps=1, init="nope")


@pytest.mark.parametrize("stream_dim", [-1, -2])
def test_rotation_in_slices_equals_the_whole_product(stream_dim, monkeypatch):
    """R1 folded a few weights at a time (columns of each expert for dim -2) gives t R or
    R^T t of the whole stack."""
    from codequant.transforms import norm_fold, rotation

    g = torch.Generator().manual_seed(0)
    R = random_hadamard(16, 0, torch.float64)
    t = torch.randn(3, 16, 16, generator=g)
    expected = (t.double() @ R if stream_dim == -1 else R.T @ t.double()).float()
    monkeypatch.setattr(norm_fold, "FOLD_CHUNK", 40)  # 2 rows of 16 (dim -1), 2 columns of 16 (dim -2)
    rotation._rotate_stream(t, stream_dim, R)
    assert torch.allclose(t, expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "phimoe"])  # RMSNorm; LayerNorm (writers centred too)
def test_norm_folding_in_slices_is_bit_identical(arch, monkeypatch):
    """Norms folded (and writers centred) a few lines at a time give exactly the weights of
    one whole-tensor fold."""
    from codequant.transforms import norm_fold

    def folded():
        model = tiny_model(arch)
        return fold_norms(model, get_adapter(model))

    whole = folded()
    monkeypatch.setattr(norm_fold, "FOLD_CHUNK", 100)  # lines of 64: one at a time
    sliced = folded()
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), sliced.state_dict().values()))
