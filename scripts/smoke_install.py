"""Smoke test of an installed codequant (run from outside the source tree by scripts/check_install.sh):
the package comes from site-packages, the compiled CPU kernels load and run (not the reference),
agree with the reference, and the CUDA sources ship as package data."""

import sys
from pathlib import Path

import torch

import codequant
from codequant.kernels import Case, Op, reference, select
from codequant.kernels.cpu import _lut
from codequant.kernels.gpu import cuda_gemv
from codequant.modules.linear import quantize_linear

where = Path(codequant.__file__).resolve()
assert "site-packages" in where.parts, f"codequant imported from {where}, not from the installed package"
missing = [s for s in cuda_gemv._SOURCES if not (cuda_gemv.SOURCE_DIR / s).is_file()]
assert not missing, f"CUDA sources {missing} missing from {cuda_gemv.SOURCE_DIR}"
torch.manual_seed(0)
layer = quantize_linear(torch.randn(96, 256), torch.randn(96), act_bits=4)
x = torch.randn(5, 256)
kernel = select(Case(Op.LINEAR, x, layer.packed, layer.act))
assert kernel.backend == "cpu", f"CPU linear runs {kernel.name}, not the C++ kernels"
y = layer(x)
assert torch.equal(y, kernel.fn(x, layer.packed, layer.act, layer.bias)), "the layer did not run the C++ kernels"
y_ref = reference.linear(x, layer.packed, layer.act, layer.bias)
err = (y - y_ref).abs().max().item() / y_ref.abs().max().item()
assert err < 2e-2, f"C++ kernel output differs from the reference by {err:.3g} (relative)"
print(f"smoke ok: codequant {where.parent}, CPU ISA {_lut.isa()}, max relative error vs reference {err:.2e}", file=sys.stderr)
