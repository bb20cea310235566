"""Session setup. Triton reads TRITON_INTERPRET when it is first imported, and the kernel
registry imports it as soon as any test touches a CodeQuant module: without a GPU, the
Triton kernels must run in the interpreter from the start of the session."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.register_assert_rewrite("tests.helpers")  # their asserts report values, as the tests' own do


@pytest.fixture
def reference_kernels():
    """Run every quantized module on the reference implementation (KernelOptions.backend)."""
    from codequant.kernels import kernel_options

    with kernel_options(backend="reference"):
        yield
