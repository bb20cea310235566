"""Hadamard matrices: the random-Hadamard rotation start and the online block transform.

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] (Sylvester); H_n / sqrt(n) is orthogonal.
A block Hadamard of block h applies H_h / sqrt(h) to each run of h consecutive channels.
Sylvester matrices factor as Kronecker products, H_ab = H_a (x) H_b for powers of two a, b, so a row
x of length ab viewed as an a x b matrix X transforms as X -> H_a X H_b: (a + b) multiply-adds per
channel instead of ab.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix H_n / sqrt(n); n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    return (_sylvester(n) / math.sqrt(n)).to(dtype)


def largest_power_of_two_block(n: int) -> int:
    """The largest power of two dividing n: the block of the online transform for n channels."""
    return n & -n


@functools.lru_cache(maxsize=32)
def _block_matrix(block: int, device: torch.device) -> torch.Tensor:
    """H_block / sqrt(block) in float32 on ``device``, made once (the online transform runs every forward)."""
    return hadamard(block, torch.float32).to(device)


# Blocks up to this size are one matmul with H_block, larger ones go through the Kronecker factors: the
# crossovers of `python -m benchmarks hadamard` (benchmarks/results/hadamard-cpu-epyc.json, one CPU thread;
# hadamard-gpu-h100.json, where one matmul wins up to block 1024 at up to 16 rows of x and up to 256 at 512).
ONE_MATMUL_MAX_BLOCK = 128
ONE_MATMUL_MAX_BLOCK_CUDA = 1024
ONE_MATMUL_MAX_BLOCK_CUDA_MANY_ROWS = 256  # above CUDA_FEW_ROWS rows
CUDA_FEW_ROWS = 16


def one_matmul_max_block(x: torch.Tensor) -> int:
    """The largest block :func:`block_hadamard` does as one matmul for x (its device and row count)."""
    if not x.is_cuda:
        return ONE_MATMUL_MAX_BLOCK
    return ONE_MATMUL_MAX_BLOCK_CUDA if x.numel() <= CUDA_FEW_ROWS * x.shape[-1] else ONE_MATMUL_MAX_BLOCK_CUDA_MANY_ROWS


def block_hadamard(x: torch.Tensor, block: int, factored: bool | None = None) -> torch.Tensor:
    """x @ blockdiag(H_block, ..., H_block) over the last dim (orthonormal, self-inverse); computed in
    float32, returned in x's dtype. ``factored``: through H_a X H_b (a x b = block) or one matmul with
    H_block; None: the factors above :func:`one_matmul_max_block`."""
    k = x.shape[-1]
    y = x.float().reshape(*x.shape[:-1], k // block, block)
    if factored is None:
        factored = block > one_matmul_max_block(x)
    if factored:
        a = 1 << (block.bit_length() - 1) // 2
        y = _block_matrix(a, x.device) @ y.reshape(*y.shape[:-1], a, block // a) @ _block_matrix(block // a, x.device)
    else:
        y = y @ _block_matrix(block, x.device)
    return y.reshape(x.shape).to(x.dtype)


def random_hadamard(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """diag(random signs) @ blockdiag Hadamard: an orthogonal n x n matrix.

    For n a power of two this is a full randomized Hadamard matrix; otherwise the
    largest power-of-two blocks are used (n = 2^a * m gives m blocks of 2^a).
    """
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    block = largest_power_of_two_block(n)
    h = torch.block_diag(*[hadamard(block, torch.float64)] * (n // block))
    return (signs[:, None] * h).to(dtype)
