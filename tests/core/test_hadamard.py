"""The online block transform equals x @ blockdiag(H_block, ...) at every block size, both ways it is computed."""

import pytest
import torch

from codequant.core.hadamard import block_hadamard, hadamard


@pytest.mark.parametrize("block", [1, 2, 64, 128, 256, 512, 2048, 4096, 8192])
def test_block_hadamard_equals_the_block_diagonal_matrix(block):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(3, 5, 2 * block, generator=g, dtype=torch.float64)
    dense = torch.block_diag(hadamard(block, torch.float64), hadamard(block, torch.float64))
    y = block_hadamard(x, block)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, x @ dense, rtol=0, atol=2e-5 * x.abs().max().item())
    for factored in (False, True):
        torch.testing.assert_close(block_hadamard(x, block, factored), y, rtol=0, atol=2e-5 * x.abs().max().item())
    torch.testing.assert_close(block_hadamard(y, block), x, rtol=0, atol=4e-5 * x.abs().max().item())


def test_block_hadamard_keeps_a_16_bit_input_dtype():
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    y = block_hadamard(x, 512)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x.float().reshape(4, 2, 512) @ hadamard(512)).reshape(4, 1024), rtol=1e-2, atol=1e-2)


def test_one_matmul_up_to_the_measured_crossover_on_the_cpu():
    from codequant.core.hadamard import ONE_MATMUL_MAX_BLOCK, one_matmul_max_block

    assert one_matmul_max_block(torch.zeros(1, 4096)) == one_matmul_max_block(torch.zeros(512, 4096)) == ONE_MATMUL_MAX_BLOCK == 128
