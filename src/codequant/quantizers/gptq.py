"""GPTQ (Frantar et al., 2023) onto the uniform grid of :mod:`codequant.quantizers.uniform`.

Minimises ||X W^T - X W_hat^T||^2 = tr((W - W_hat) H (W - W_hat)^T) / 2 with H = 2/n X^T X,
one column at a time: quantize column k, then spread its error onto the columns not yet
quantized through U = chol(H^-1)^T (upper), the Cholesky form of the optimal-brain-surgeon
update:
    e = (w_k - q(w_k)) / U_kk,        W[:, j] -= e U_kj   for j > k.
Updates inside a block of ``block_size`` columns are applied at once; the block's errors
reach later columns in one matmul after it (the "lazy batch" update).
"""

from __future__ import annotations

import torch

from ..core.format import check_group_size
from .codebook import check_bits
from .uniform import grid_codebook, quantize_to_grid, uniform_grid
from .weight_quantizer import WeightQuantizer


def accumulate_hessian(hessian: torch.Tensor | None, x: torch.Tensor, n_seen: int) -> tuple[torch.Tensor, int]:
    """Streaming H = 2/n sum_t x_t x_t^T over the rows of x [..., K]: returns (H [K, K] float32, n)."""
    x = x.reshape(-1, x.shape[-1]).float()
    if hessian is None:
        hessian = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    n = n_seen + x.shape[0]
    if x.shape[0] == 0:
        return hessian, n_seen
    return torch.addmm(hessian, x.T, x, beta=n_seen / n, alpha=2.0 / n), n


def _prepare_hessian(hessian: torch.Tensor, e: int, k: int) -> torch.Tensor:
    """H as a float32 [E, K, K] copy, with dead columns (H_kk = 0) given H_kk = 1."""
    h = hessian.float().expand(e, k, k).clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)
    return h


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U = chol((H + damp * mean(diag H) I)^-1)^T, upper [..., K, K] (damps ``h`` in place)."""
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: (idx int64 [..., N, K], codebook float32 [..., N, K // G, 2^bits]).

    ``weight`` [N, K] or a stack [E, N, K]; ``hessian`` [K, K] (shared) or [E, K, K]. All
    experts run together. Dead columns (H_kk = 0: the input is always zero) get H_kk = 1, so
    they are rounded and pass no error on. ``damp`` adds damp * mean(diag H) to the diagonal.
    Without act_order each group's grid is fitted, on the already updated weights, when its
    first column is reached. ``act_order`` visits columns by decreasing H_kk; the grids are
    then fitted up front on the original groups ("static groups"), so that groups remain
    contiguous columns in the packed format.
    """
    check_bits(bits)
    *lead, n, k = weight.shape
    if len(lead) > 1:
        raise ValueError(f"weight must be [N, K] or [E, N, K], got {tuple(weight.shape)}")
    g = check_group_size(group_size, k)
    w = weight.float().reshape(-1, n, k).clone()
    e = w.shape[0]
    h = _prepare_hessian(hessian, e, k)
    diag = h.diagonal(dim1=-2, dim2=-1)
    scale = torch.empty(e, n, k // g, device=w.device)
    zero = torch.empty_like(scale)
    if act_order:
        scale, zero = uniform_grid(w.view(e, n, k // g, g), bits)
        perm = diag.argsort(-1, descending=True)  # [E, K]
        w = w.gather(-1, perm[:, None, :].expand(e, n, k))
        h = h.gather(-1, perm[:, None, :].expand(e, k, k)).gather(-2, perm[:, :, None].expand(e, k, k))
        diag = h.diagonal(dim1=-2, dim2=-1)
        group_of = perm // g
    u = inverse_cholesky(h, damp)
    del h

    q = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                grp = group_of[:, None, col : col + 1].expand(e, n, 1)
                s, z = scale.gather(-1, grp)[..., 0], zero.gather(-1, grp)[..., 0]
            else:
                if col % g == 0:  # grid of the group, fitted on its current (updated) weights
                    span = torch.cat((w1[..., i : i + g], w[..., i2 : col + g]), -1)
                    scale[..., col // g], zero[..., col // g] = uniform_grid(span, bits)
                s, z = scale[..., col // g], zero[..., col // g]
            col_q = quantize_to_grid(w1[..., i], s, z, bits)
            q[..., col] = col_q
            err = (w1[..., i] - s * (col_q - z)) / u[:, None, col, col]
            w1[..., i:] -= err[..., None] * u[:, None, col, col:i2]
            err1[..., i] = err
        w[..., i2:] -= err1 @ u[:, i1:i2, i2:]

    if act_order:
        q = q.gather(-1, perm.argsort(-1)[:, None, :].expand(e, n, k))
    idx = q.long().reshape(weight.shape)
    return idx, grid_codebook(scale, zero, bits).reshape(*lead, n, k // g, 2**bits)


GPTQ = WeightQuantizer(
    fit=lambda weight, stats, config, group_size: gptq(weight, stats.hessian, config.wbits, group_size),
    statistics=lambda config: frozenset({"hessian"}),
)
