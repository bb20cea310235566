"""Codebook assignment with Hessian error feedback (GPTQ's column walk onto learned codebooks).

The layer-output error of W_hat = C[idx] on inputs with H = 2 E[x x^T] is, per row w,

    f(w_hat) = (w - w_hat) H (w - w_hat)^T.

Nearest-centroid assignment (k-means) minimises only the diagonal of that form. Here the
columns are walked in order as GPTQ does: column k is assigned to the nearest centroid of its
row's (or group's) codebook, and its error is pushed onto the columns not yet assigned through
U = chol(H^-1)^T (upper),

    e = (w_k - c[idx_k]) / U_kk,        W[:, j] -= e U_kj   for j > k,

with the block-lazy update of :mod:`codequant.quantizers.gptq`. The centroids are then refit
on the final assignment: with one-hot M_j [G, C] of group j and r = (w - w_hat) H, the block
Newton step c_j += (M_j^T H_jj M_j)^-1 M_j^T r_j (exact for one codebook per row; a
block-Jacobi step across groups, kept per row only where f drops). Walk and refit alternate;
every row keeps the best state seen, the starting k-means state included, so the result is
never worse than nearest-centroid under f.
"""

from __future__ import annotations

import torch

from ..core.format import check_group_size
from .gptq import _prepare_hessian, inverse_cholesky

_CHUNK = 1 << 22  # row-chunk budget (elements of the [rows, K, C] one-hot) for the refit


def _as_stack(weight: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor, group_size: int | None):
    *lead, n, k = weight.shape
    if len(lead) > 1:
        raise ValueError(f"weight must be [N, K] or [E, N, K], got {tuple(weight.shape)}")
    g = check_group_size(group_size, k)
    if codebook.shape[-2] * g != k:
        raise ValueError(f"codebook has {codebook.shape[-2]} groups, expected {k // g}")
    e = weight.reshape(-1, n, k).shape[0]
    if hessian.shape[-2:] != (k, k) or hessian.dim() not in (2, 3) or (hessian.dim() == 3 and hessian.shape[0] not in (1, e)):
        raise ValueError(f"hessian must be [K, K] or [E, K, K] with K = {k} and E = {e}, got {tuple(hessian.shape)}")
    w = weight.float().reshape(e, n, k)
    cb = codebook.float().reshape(e, n, k // g, codebook.shape[-1])
    return w, _prepare_hessian(hessian, e, k), cb, g


def feedback_assign(w: torch.Tensor, u: torch.Tensor, cb: torch.Tensor, g: int, block_size: int = 128) -> torch.Tensor:
    """idx [E, N, K] by the error-feedback walk over w [E, N, K] with U [E, K, K], codebooks cb [E, N, K/G, C]."""
    w = w.clone()
    e, n, k = w.shape
    idx = torch.empty(e, n, k, dtype=torch.long, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            centroids = cb[:, :, col // g]
            nearest = (w1[..., i, None] - centroids).abs().argmin(-1)
            idx[..., col] = nearest
            err = (w1[..., i] - centroids.gather(-1, nearest[..., None])[..., 0]) / u[:, None, col, col]
            w1[..., i:] -= err[..., None] * u[:, None, col, col:i2]
            err1[..., i] = err
        w[..., i2:] -= err1 @ u[:, i1:i2, i2:]
    return idx


def _dequantize(idx: torch.Tensor, cb: torch.Tensor, g: int) -> torch.Tensor:
    e, n, k = idx.shape
    return cb.gather(-1, idx.view(e, n, k // g, g)).view(e, n, k)


def output_error(w: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, cb: torch.Tensor, g: int) -> torch.Tensor:
    """f per row [E, N]: (w - w_hat) H (w - w_hat)^T."""
    d = w - _dequantize(idx, cb, g)
    return ((d @ h) * d).sum(-1)


def refit_centroids(w: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, cb: torch.Tensor, g: int) -> torch.Tensor:
    """One block Newton step on the centroids for fixed idx (see the module doc): new cb [E, N, K/G, C]."""
    e, n, k = w.shape
    groups, c = k // g, cb.shape[-1]
    r = (w - _dequantize(idx, cb, g)) @ h  # [E, N, K]: minus half the gradient w.r.t. w_hat
    rhs = torch.zeros_like(cb).scatter_add_(-1, idx.view(e, n, groups, g), r.view(e, n, groups, g))
    blocks = h.view(e, groups, g, groups, g).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [E, K/G, G, G]
    out = cb.clone()
    step = max(1, _CHUNK // (k * c))
    for x in range(e):
        for r0 in range(0, n, step):
            rows = slice(r0, min(r0 + step, n))
            onehot = torch.nn.functional.one_hot(idx[x, rows].view(-1, groups, g), c).float()  # [R, K/G, G, C]
            gram = onehot.transpose(-1, -2) @ (blocks[x] @ onehot)  # [R, K/G, C, C]
            ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-12)
            gram = gram + torch.diag_embed(ridge.expand(-1, -1, c) + (gram.diagonal(dim1=-2, dim2=-1) == 0).float())
            out[x, rows] += torch.linalg.solve(gram, rhs[x, rows, ..., None])[..., 0]
    return out


def feedback_codebooks(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    idx: torch.Tensor,
    codebook: torch.Tensor,
    group_size: int | None = None,
    alternations: int = 2,
    refit: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx int64 [..., N, K], codebook float32 [..., N, K/G, C]) from the starting pair (k-means).

    ``weight`` [N, K] or [E, N, K]; ``hessian`` [K, K] shared or [E, K, K] per expert.
    ``alternations`` rounds of walk (+ centroid refit when ``refit``); every row keeps its
    lowest-f state. ``damp`` damps H for the walk only (f uses H itself).
    """
    w, h, cb, g = _as_stack(weight, hessian, codebook, group_size)
    best_idx, best_cb = idx.reshape(w.shape).clone(), cb.clone()
    best_err = output_error(w, h, best_idx, best_cb, g)
    u = inverse_cholesky(h.clone(), damp)
    for _ in range(alternations):
        cand_idx = feedback_assign(w, u, cb, g, block_size)
        cand_cb = refit_centroids(w, h, cand_idx, cb, g) if refit else cb
        for i, c in ((cand_idx, cb), (cand_idx, cand_cb)) if refit else ((cand_idx, cb),):
            err = output_error(w, h, i, c, g)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_idx[better], best_cb[better] = i[better], c[better]
        cb = cand_cb
    return best_idx.reshape(idx.shape), best_cb.reshape(codebook.shape)
