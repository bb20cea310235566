"""Stage 2: POG, permutation-invariant outlier grouping.

When a weight [N, K] is clustered per group of g < K columns, the columns that share a
group share codebooks. Channels between a producer and a consumer can be reordered for
free (producer rows and consumer columns permuted alike), so POG reorders them to spread
outlier columns evenly over the groups:

1. sort the consumer's columns by L1 norm (descending) and cut them into blocks of
   ``block_size`` consecutive columns (the top ``block_size`` columns share a group, so
   small blocks spread outliers most evenly; 2 is the default);
2. rank the blocks by spread: the mean over rows of the standard deviation within the
   block's columns;
3. group i = the i-th most spread block, followed by ``g / block_size - 1`` of the
   remaining (low-spread) blocks, dealt to the groups in snake order so every group gets
   a similar mix.

Where it applies (the network is unchanged): each expert's intermediate channels (gate
and up rows of ``gate_up_proj`` [E, 2I, H], columns of ``down_proj`` [E, H, I]), the
shared expert's and dense MLPs' intermediate channels, and the value channels inside one
KV head (v_proj rows, o_proj columns of every query head reading that head).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from ..adapters import ArchitectureAdapter
from ..core.format import check_group_size


def pog_permutation(weight: torch.Tensor, group_size: int, block_size: int = 2) -> torch.Tensor:
    """The POG column order for ``weight`` [N, K]: a permutation (int64 [K]) such that
    ``weight[:, perm]`` has outliers spread over its K / group_size groups.

    ``block_size`` must divide ``group_size``.
    """
    n, k = weight.shape
    group_size = check_group_size(group_size, k)
    if block_size <= 0 or group_size % block_size:
        raise ValueError(f"block size {block_size} does not divide group size {group_size}")
    block, n_groups = block_size, k // group_size
    w = weight.detach().double()
    order = torch.argsort(w.abs().sum(0), descending=True, stable=True)
    blocks = order.view(-1, block)  # [K / block, block], by L1 norm
    spread = w[:, blocks].std(dim=-1, unbiased=False).mean(0)  # [K / block]
    ranked = blocks[torch.argsort(spread, descending=True, stable=True)]
    groups = [[ranked[i]] for i in range(n_groups)]
    for j, low in enumerate(ranked[n_groups:]):
        lap, pos = divmod(j, n_groups)
        groups[pos if lap % 2 == 0 else n_groups - 1 - pos].append(low)
    return torch.cat([torch.cat(grp) for grp in groups]).to(weight.device)


def apply_pog(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    group_size: int,
    block_size: int = 2,
    exclude: Collection[str] = (),
    layers: Collection[int] | None = None,
) -> int:
    """Permute every permutable channel set whose consumer is clustered in groups of
    ``group_size`` < its in_features; in place, the network is unchanged.

    Value heads are permuted within each head, and only when group_size < head_dim
    (groups spanning whole heads are not changed by an in-head order). ``block_size``
    as in :func:`pog_permutation` (lowered to gcd(block_size, group_size)). Returns the number
    of channel sets permuted.

    ``exclude``: down projections (names relative to the model, e.g. the keys returned by
    :func:`~codequant.transforms.rotation.fold_online_hadamard`) whose intermediate
    channels are left alone. A down projection that already holds an online Hadamard
    (W H_b, input h H_b) must be excluded: H_b mixes the channels between the producer
    and the consumer, so permuting them would change the network. Run POG before
    fold_online_hadamard instead (it is legal then, though H_b mixes the grouping again).
    ``layers``: only these decoder layers (None: all).
    """
    gate, up, down = adapter.layout.swiglu
    block_size = math.gcd(block_size, group_size)
    count = 0
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers(model)):
            if layers is not None and i not in layers:
                continue
            prefix = adapter.layer_name(i)
            experts = adapter.experts(layer)
            excluded = f"{prefix}.{adapter.layout.mlp}.{adapter.layout.experts}" in exclude
            if experts is not None and not excluded and group_size < experts.down_proj.shape[-1]:
                for e in range(experts.down_proj.shape[0]):
                    perm = pog_permutation(experts.down_proj[e], group_size, block_size)
                    _permute_experts(experts, e, perm)
                    count += 1
            for name, mlp in adapter.swiglu_mlps(layer):
                d = getattr(mlp, down)
                if f"{prefix}.{name}.{down}" not in exclude and group_size < d.in_features:
                    perm = pog_permutation(d.weight, group_size, block_size)
                    _permute_rows(getattr(mlp, gate), perm)
                    _permute_rows(getattr(mlp, up), perm)
                    _permute_columns(d.weight, slice(None), perm)
                    count += 1
            heads = adapter.value_heads(layer, model.config)
            if heads is not None and group_size < heads.head_dim and heads.head_dim % group_size == 0:
                for j in range(heads.num_kv_heads):
                    cols = heads.o_columns(j)
                    stats = torch.cat([heads.o_proj.weight[:, c] for c in cols], dim=0)
                    perm = pog_permutation(stats, group_size, block_size)
                    rows = torch.arange(heads.v_rows(j).start, heads.v_rows(j).stop, device=perm.device)
                    _permute_rows(heads.v_proj, rows[perm], rows)
                    for c in cols:
                        _permute_columns(heads.o_proj.weight, c, perm)
                    count += 1
    return count


def _permute_experts(experts: nn.Module, e: int, perm: torch.Tensor) -> None:
    i = experts.down_proj.shape[-1]
    gu = experts.gate_up_proj
    gu[e, :i] = gu[e, :i][perm]
    gu[e, i:] = gu[e, i:][perm]
    experts.down_proj[e] = experts.down_proj[e][:, perm]


def _permute_rows(linear: nn.Linear, src: torch.Tensor, dst: torch.Tensor | None = None) -> None:
    """Rows ``dst`` (all rows by default) of weight and bias <- rows ``src``."""
    dst = slice(None) if dst is None else dst
    linear.weight[dst] = linear.weight[src]
    if linear.bias is not None:
        linear.bias[dst] = linear.bias[src]


def _permute_columns(weight: torch.Tensor, cols: slice, perm: torch.Tensor) -> None:
    block = weight[:, cols]
    block.copy_(block[:, perm].clone())
