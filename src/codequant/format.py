"""The packed CodeQuant weight format (format version 2).

A weight W of shape [..., N, K] (leading dims: a stack of experts, or none) is stored as
three tensors, and every kernel (reference, CPU, GPU) reads exactly these:

``indices``  uint8 [..., N, KP // 2], KP = ceil(K / 64) * 64.
    Four-bit centroid indices, two per byte, in blocks of 64 columns: byte ``j`` (0..31)
    of block ``b`` holds column ``64*b + j`` in its low nibble and column ``64*b + 32 + j``
    in its high nibble. One block's low nibbles are 32 consecutive columns, its high
    nibbles the next 32, so a SIMD lane (CPU) or a tile (GPU) unpacks with one mask and
    one shift and no shuffle of the activations. Columns K..KP-1 are padding (index 0);
    kernels mask them.
``codebook`` float16 [..., N, K // G, 16], G the group size (G = K: one codebook per row).
    Entry ``c`` of group ``g`` of row ``n`` is the value of every weight of that group
    whose index is ``c``. With b < 4 bits only the first 2^b entries are used (the rest
    are zero); indices are still stored as nibbles.
``row_sum``  float32 [..., N], row_sum[n] = sum_k W_hat[n, k].
    The constant the asymmetric-activation lookup needs:
    y_n = s * sum_k W_hat[n,k] * q_k - s * z * row_sum[n]   for x_k ~ s * (q_k - z).

W_hat[n, k] = codebook[n, k // G, idx[n, k]] is the weight every path computes with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 2  # 2: module specs bound into the safetensors headers (the packed layout is that of 1)
BLOCK = 64  # columns per packing block
CODEBOOK_SIZE = 16
CODEBOOK_DTYPE = torch.float16


def padded_columns(k: int) -> int:
    """KP: K rounded up to the packing block."""
    return -(-k // BLOCK) * BLOCK


def pack_indices(idx: torch.Tensor) -> torch.Tensor:
    """Pack integer indices [..., N, K] in 0..15 into uint8 [..., N, KP // 2] (see module doc)."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > 15):
        raise ValueError("indices must lie in 0..15 to be packed into 4 bits")
    *lead, n, k = idx.shape
    kp = padded_columns(k)
    full = torch.zeros(*lead, n, kp, dtype=torch.uint8, device=idx.device)
    full[..., :k] = idx.to(torch.uint8)
    blocks = full.view(*lead, n, kp // BLOCK, 2, BLOCK // 2)
    packed = blocks[..., 0, :] | (blocks[..., 1, :] << 4)
    return packed.reshape(*lead, n, kp // 2).contiguous()


def unpack_indices(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: uint8 [..., N, KP // 2] -> int64 [..., N, K]."""
    *lead, n, half = packed.shape
    blocks = packed.view(*lead, n, half // (BLOCK // 2), BLOCK // 2)
    full = torch.stack((blocks & 0xF, blocks >> 4), dim=-2)
    return full.reshape(*lead, n, half * 2)[..., :k].long()


@dataclass
class PackedWeight:
    """One packed weight (or a stack of experts' weights); see the module doc for layout."""

    indices: torch.Tensor
    codebook: torch.Tensor
    row_sum: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.indices.shape[-2]

    @property
    def group_size(self) -> int:
        return self.in_features // self.codebook.shape[-2]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [..., N, K] = codebook[n, k // G, idx[n, k]]."""
        return dequantize(self.indices, self.codebook, self.in_features, dtype)

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.indices.to(device), self.codebook.to(device), self.row_sum.to(device), self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.codebook, self.row_sum))


def dequantize(indices: torch.Tensor, codebook: torch.Tensor, k: int, dtype=torch.float32) -> torch.Tensor:
    """W_hat [..., N, K] from packed indices and codebooks."""
    idx = unpack_indices(indices, k)
    *lead, n, groups, size = codebook.shape
    g = k // groups
    idx = idx.view(*lead, n, groups, g)
    return torch.gather(codebook.to(dtype), -1, idx).view(*lead, n, k)


def pack(idx: torch.Tensor, codebook: torch.Tensor) -> PackedWeight:
    """Build a :class:`PackedWeight` from indices [..., N, K] and codebooks [..., N, K // G, C<=16].

    Codebooks are padded to 16 entries and rounded to float16; ``row_sum`` is computed
    from the rounded codebook so that every path agrees exactly.
    """
    *lead, n, k = idx.shape
    groups, size = codebook.shape[-2:]
    if size > CODEBOOK_SIZE:
        raise ValueError(f"a codebook holds at most {CODEBOOK_SIZE} entries, got {size}")
    if k % groups:
        raise ValueError(f"{groups} groups do not divide {k} columns")
    cb = torch.zeros(*lead, n, groups, CODEBOOK_SIZE, dtype=CODEBOOK_DTYPE, device=codebook.device)
    cb[..., :size] = codebook.to(CODEBOOK_DTYPE)
    packed = pack_indices(idx)
    w_hat = dequantize(packed, cb, k, torch.float32)
    return PackedWeight(packed, cb, w_hat.sum(-1), k)


def bits_per_weight(weight: PackedWeight) -> float:
    """Storage bits per weight: 4-bit indices plus the codebooks and row constants."""
    n_weights = weight.indices.shape[:-1].numel() * weight.in_features
    return 8.0 * weight.nbytes() / n_weights
