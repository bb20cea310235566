"""Tensor-parallel slices of packed CodeQuant weights (no vLLM needed).

A column-parallel linear keeps rows [r*N/t, (r+1)*N/t) of indices, codebook and row_sum.
A row-parallel linear keeps columns [r*K/t, (r+1)*K/t) of W_hat: the indices' packing blocks
of 64 columns (32 bytes each) of that range, the codebook groups of that range (one codebook
per row is shared by every shard), and a row_sum recomputed over the shard's columns, so that
sum over shards of row_sum_r = row_sum and y = sum_r y_r.
"""

from __future__ import annotations

import torch

from ..core.format import BLOCK, PackedWeight


def row_slice(t: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """Rows [rank*n/world, (rank+1)*n/world) of ``t`` along ``dim`` (n divisible by world)."""
    n = t.shape[dim]
    if n % world:
        raise ValueError(f"{n} rows do not split over {world} tensor-parallel ranks")
    step = n // world
    return t.narrow(dim, rank * step, step)


def column_shard_features(k: int, groups: int, world: int) -> tuple[int, int]:
    """(K per shard, codebook groups per shard) of a row-parallel split, or a ValueError saying why not."""
    if k % (world * BLOCK):
        raise ValueError(
            f"in_features {k} do not split into {world} tensor-parallel shards of whole {BLOCK}-column packing blocks"
        )
    if groups > 1 and groups % world:
        raise ValueError(f"{groups} codebook groups of a {k}-column row do not split over {world} tensor-parallel ranks")
    return k // world, 1 if groups == 1 else groups // world


def column_shard_part(part: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The row-parallel shard ``rank`` of a packed ``indices`` or ``codebook`` tensor ([..., N, ...])."""
    if part == "indices":
        return row_slice(t, rank, world, dim=-1)
    if part == "codebook":
        return t if t.shape[-2] == 1 else row_slice(t, rank, world, dim=-2)
    raise ValueError(f"no column shard of packed part {part!r}; row_sum is recomputed with shard_row_sum")


def shard_row_sum(indices: torch.Tensor, codebook: torch.Tensor, k_shard: int) -> torch.Tensor:
    """row_sum of a K shard: sum over its columns of W_hat."""
    return PackedWeight(indices, codebook, torch.empty(0), k_shard).dequantize(torch.float32).sum(-1)
