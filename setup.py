"""Build of the compiled CPU kernels (codequant.kernels.cpu._lut); metadata lives in pyproject.toml.

Each instruction set is one translation unit that enables its features with
``#pragma GCC target`` (csrc/cpu/cq_avx512.cpp, cq_avx2.cpp); the portable file and the
module are compiled for the baseline ISA, and the module picks a path at run time with
``__builtin_cpu_supports`` (override: CODEQUANT_CPU_ISA=portable|avx2|avx512). No
-march=native: the built wheel runs on any x86-64 (or other) CPU.
"""

import os
import sys

from setuptools import Extension, setup

SOURCES = ["cq_module.cpp", "cq_portable.cpp", "cq_avx2.cpp", "cq_avx512.cpp"]

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/std:c++17"], []
else:
    compile_args = ["-O3", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
    link_args = ["-pthread"]

ext = Extension(
    "codequant.kernels.cpu._lut",
    sources=[os.path.join("csrc", "cpu", name) for name in SOURCES],
    depends=[os.path.join("csrc", "cpu", name) for name in ("cq_kernels.h", "cq_avx512_wide.h")],
    include_dirs=[os.path.join("csrc", "cpu")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    language="c++",
)

setup(ext_modules=[ext])
