"""Tensor-parallel shards of packed weights (codequant.vllm.sharding; vLLM not needed)."""

from __future__ import annotations

import pytest
import torch

from codequant.core.format import pack
from codequant.vllm.sharding import column_shard_features, column_shard_part, row_slice, shard_row_sum


def random_packed(n: int, k: int, group: int, lead=(), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 16, (*lead, n, k), generator=g)
    codebook = torch.randn(*lead, n, k // group, 16, generator=g)
    return pack(idx, codebook)


@pytest.mark.parametrize("group", [256, 64])  # one codebook per row (shared by shards) / codebook groups split
@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_shards_concatenate_to_the_weight(group, world):
    w = random_packed(8, 256, group, lead=(3,))
    full = w.dequantize()
    k_shard, groups = column_shard_features(256, 256 // group, world)
    parts, sums = [], []
    for rank in range(world):
        idx = column_shard_part("indices", w.indices, rank, world)
        cb = column_shard_part("codebook", w.codebook, rank, world)
        assert cb.shape[-2] == groups
        shard = type(w)(idx, cb, shard_row_sum(idx, cb, k_shard), k_shard)
        parts.append(shard.dequantize())
        sums.append(shard.row_sum)
    assert torch.equal(torch.cat(parts, dim=-1), full)
    torch.testing.assert_close(sum(sums), w.row_sum, rtol=1e-5, atol=1e-4)


def test_column_parallel_rows_concatenate():
    w = random_packed(8, 128, 64)
    for t in (w.indices, w.codebook, w.row_sum):
        assert torch.equal(torch.cat([row_slice(t, r, 2) for r in range(2)]), t)


def test_unsplittable_shapes_are_refused():
    with pytest.raises(ValueError, match="in_features 192 do not split into 2 tensor-parallel shards of whole 64-column packing blocks"):
        column_shard_features(192, 1, 2)
    with pytest.raises(ValueError, match="3 codebook groups of a 384-column row do not split over 2 tensor-parallel ranks"):
        column_shard_features(384, 3, 2)
    with pytest.raises(ValueError, match="6 rows do not split over 4 tensor-parallel ranks"):
        row_slice(torch.zeros(6), 0, 4)
