"""Tensor-parallel shards of packed weights (codequant.vllm.sharding; vLLM not needed)."""

from __future__ import annotations

import pytest
import torch

from codequant.vllm.sharding import column_shard_features, column_shard_part, row_slice, shard_row_sum
from tests.helpers.packed import random_packed


@pytest.mark.parametrize("group", [256, 64])  # one codebook per row (shared by shards) / codebook groups split
@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_shards_concatenate_to_the_weight(group, world):
    w = random_packed(8, 256, group_size=group, lead=(3,), scale=1.0)
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
    w = random_packed(8, 128, group_size=64, scale=1.0)
    for t in (w.indices, w.codebook, w.row_sum):
        assert torch.equal(torch.cat([row_slice(t, r, 2) for r in range(2)]), t)


def test_unsplittable_shapes_are_refused():
    with pytest.raises(ValueError, match="in_features 192 do not split into 2 tensor-parallel shards of whole 64-column packing blocks"):
        column_shard_features(192, 1, 2)
    with pytest.raises(ValueError, match="3 codebook groups of a 384-column row do not split over 2 tensor-parallel ranks"):
        column_shard_features(384, 3, 2)
    with pytest.raises(ValueError, match="6 rows do not split over 4 tensor-parallel ranks"):
        row_slice(torch.zeros(6), 0, 4)
