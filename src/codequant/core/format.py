"""The packed CodeQuant weight format (format version 3).

A weight W of shape [..., N, K] (leading dims: a stack of experts, or none) is held in memory
as three tensors, and every kernel (reference, CPU, GPU) reads exactly these:

``indices``  uint8 [..., N, KP // 2], KP = ceil(K / 64) * 64.
    Centroid indices, two per byte, in blocks of 64 columns: byte ``j`` (0..31)
    of block ``b`` holds column ``64*b + j`` in its low nibble and column ``64*b + 32 + j``
    in its high nibble. One block's low nibbles are 32 consecutive columns, its high
    nibbles the next 32, so a SIMD lane (CPU) or a tile (GPU) unpacks with one mask and
    one shift and no shuffle of the activations. Columns K..KP-1 are padding (index 0);
    kernels mask them.
``codebook`` float16 [..., N, K // G, 16], G the group size (G = K: one codebook per row).
    Entry ``c`` of group ``g`` of row ``n`` is the value of every weight of that group
    whose index is ``c``. With b < 4 bits only the first 2^b entries are used (the rest
    are zero).
``row_sum``  float32 [..., N], row_sum[n] = sum_k W_hat[n, k].
    The constant the asymmetric-activation lookup needs:
    y_n = s * sum_k W_hat[n,k] * q_k - s * z * row_sum[n]   for x_k ~ s * (q_k - z).

W_hat[n, k] = codebook[n, k // G, idx[n, k]] is the weight every path computes with.

On disk (:func:`pack_for_disk` / :func:`unpack_from_disk`) a weight of b-bit indices takes
8 * (KP * b / 8 + 2 * 2^b * K / G + 4) / K bits per weight:

``indices``  uint8 [..., N, KP * b // 8].
    b = 4: the in-memory nibble layout, byte for byte. b < 4: each row's KP indices (padding
    included) as a little-endian bit stream: index ``c`` is bits ``b*c .. b*c + b - 1`` of
    the row, bit ``i`` of the row being bit ``i % 8`` of byte ``i // 8``.
``codebook`` float16 [..., N, K // G, 2^b], the used entries.
``row_sum``  as in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 3  # 3: indices and codebooks stored at the index bit width (2: module specs in the headers)
BLOCK = 64  # columns per packing block
CODEBOOK_SIZE = 16
CODEBOOK_DTYPE = torch.float16


def padded_columns(k: int) -> int:
    """KP: K rounded up to the packing block."""
    return -(-k // BLOCK) * BLOCK


def effective_group_size(group_size: int | None, k: int) -> int:
    """The group size G of a row of K columns: ``group_size``, or K (one group) when it is None or 0."""
    return group_size or k


def check_group_size(group_size: int | None, k: int, what: str = "group size") -> int:
    """:func:`effective_group_size`, checked to divide K (weights' codebooks and activations' scales alike)."""
    g = effective_group_size(group_size, k)
    if g <= 0 or k % g:
        raise ValueError(f"{what} {g} does not divide the row length {k}")
    return g


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


def stored_index_bytes(k: int, bits: int) -> int:
    """Bytes of one row of ``bits``-bit indices on disk: KP * bits / 8 (KP is a multiple of 64)."""
    return padded_columns(k) * bits // 8


def bits_per_weight(weight: PackedWeight, bits: int) -> float:
    """Bits per weight on disk at ``bits``-bit indices: indices, the 2^bits used codebook entries
    and the row constants, 8 * (KP * bits / 8 + 2 * 2^bits * K / G + 4) / K."""
    groups = weight.codebook.shape[-2]
    per_row = stored_index_bytes(weight.in_features, bits) + groups * 2**bits * weight.codebook.element_size() + weight.row_sum.element_size()
    return 8.0 * per_row / weight.in_features


_ROW_CHUNK = 2**22  # elements per chunk when converting to or from the disk layout (bounds the temporaries)


def _by_rows(convert, t: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """``convert`` applied to chunks of the rows of ``t`` [..., C], giving [..., columns]."""
    rows = t.reshape(-1, t.shape[-1])
    out = torch.empty(rows.shape[0], columns, dtype=dtype, device=t.device)
    step = max(1, _ROW_CHUNK // max(1, t.shape[-1]))
    for s in range(0, rows.shape[0], step):
        out[s:s + step] = convert(rows[s:s + step])
    return out.reshape(*t.shape[:-1], columns)


def _bit_stream(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices [R, KP] (< 2^bits) as the little-endian bit stream uint8 [R, KP * bits // 8]:
    every 8 indices make one (8 * bits)-bit word, sum_j idx_j << (bits * j), stored in ``bits`` bytes."""
    r, kp = idx.shape
    shift = torch.arange(8, dtype=torch.int32, device=idx.device)
    word = (idx.view(r, kp // 8, 8).to(torch.int32) << (bits * shift)).sum(-1, dtype=torch.int32)
    stream = (word.unsqueeze(-1) >> (8 * shift[:bits])) & 0xFF
    return stream.to(torch.uint8).view(r, kp * bits // 8)


def _from_bit_stream(stream: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_bit_stream`: uint8 [R, KP * bits // 8] -> int32 [R, KP]."""
    r, n = stream.shape
    shift = torch.arange(8, dtype=torch.int32, device=stream.device)
    word = (stream.view(r, n // bits, bits).to(torch.int32) << (8 * shift[:bits])).sum(-1, dtype=torch.int32)
    return ((word.unsqueeze(-1) >> (bits * shift)) & (2**bits - 1)).view(r, n * 8 // bits)


def pack_for_disk(name: str, tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored form of the packed tensor ``name`` (its state-dict key) of a ``bits``-bit weight.

    ``...indices``: in-memory nibbles [..., N, KP // 2] -> bit stream [..., N, KP * bits // 8]
    (bits = 4: unchanged); ``...codebook``: its first 2^bits entries; anything else unchanged.
    """
    if name.endswith("indices") and bits < 4:
        def convert(rows: torch.Tensor) -> torch.Tensor:
            idx = unpack_indices(rows, 2 * rows.shape[-1])
            if idx.numel() and int(idx.max()) >= 2**bits:
                raise ValueError(f"{name} holds index {int(idx.max())}, which does not fit in {bits} bits")
            return _bit_stream(idx, bits)

        return _by_rows(convert, tensor, tensor.shape[-1] * bits // 4, torch.uint8)
    if name.endswith("codebook") and bits < 4:
        if bool(tensor[..., 2**bits:].any()):
            raise ValueError(f"{name} has nonzero entries past the {2**bits} that {bits}-bit indices address")
        return tensor[..., : 2**bits].contiguous()
    return tensor


def unpack_from_disk(name: str, tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_for_disk`: the in-memory form of the stored tensor ``name``."""
    if name.endswith("indices") and bits < 4:
        return _by_rows(lambda rows: pack_indices(_from_bit_stream(rows, bits)), tensor, tensor.shape[-1] * 4 // bits, torch.uint8)
    if name.endswith("codebook") and bits < 4:
        return torch.nn.functional.pad(tensor, (0, CODEBOOK_SIZE - 2**bits))
    return tensor
