"""Build of the compiled kernels; metadata lives in pyproject.toml.

CPU, codequant.kernels.cpu._lut (always built): one translation unit per instruction set,
each compiled with its own flags (ISA_FLAGS, as ggml does), never a target pragma in front of
standard headers, so GCC 12, GCC 13+ and Clang all build it. The portable file and the module
are compiled for the baseline ISA, and the module picks a path at run time with
``__builtin_cpu_supports`` (override: CODEQUANT_CPU_ISA=portable|avx2|avx512). No
-march=native: the built wheel runs on any x86-64 (or other) CPU.

CUDA, codequant.kernels.gpu._cq_gemv (optional): built when torch with CUDA and a CUDA toolkit
are importable by this build (``pip install --no-build-isolation .``; an isolated build has
no torch) or CODEQUANT_BUILD_CUDA=1 asks for it; CODEQUANT_BUILD_CUDA=0 skips it. Without it
the sources, package data under codequant/kernels/gpu/csrc, are compiled on first use.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU_SOURCES = ["cq_module.cpp", "cq_portable.cpp", "cq_avx2.cpp", "cq_avx512.cpp", "cq_avx512_vbmi.cpp"]
CUDA_DIR = os.path.join("src", "codequant", "kernels", "gpu", "csrc")

_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512dq"]
# Compiler flags of each instruction-set translation unit (x86-64 with GCC or Clang).
ISA_FLAGS = {"cq_avx2.cpp": _AVX2, "cq_avx512.cpp": _AVX512, "cq_avx512_vbmi.cpp": [*_AVX512, "-mavx512vbmi"]}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/std:c++17"], []
else:
    # -Wno-uninitialized: GCC 12 warns inside its own AVX-512 intrinsics headers (fixed in GCC 13)
    compile_args = ["-O3", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-uninitialized"]
    link_args = ["-pthread"]

cpu_ext = Extension(
    "codequant.kernels.cpu._lut",
    sources=[os.path.join("csrc", "cpu", name) for name in CPU_SOURCES],
    depends=[os.path.join("csrc", "cpu", name) for name in ("cq_kernels.h", "cq_avx512_wide.h")],
    include_dirs=[os.path.join("csrc", "cpu")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    language="c++",
)


def isa_flags(source: str) -> list[str]:
    """The instruction-set flags of one CPU source file (none off x86-64 or with MSVC)."""
    if not X86_64 or sys.platform == "win32":
        return []
    return ISA_FLAGS.get(os.path.basename(source), [])


def cuda_build():
    """(CUDAExtension, torch's BuildExtension) when the CUDA kernels are to be built here, else (None, None)."""
    want = os.environ.get("CODEQUANT_BUILD_CUDA", "auto")
    if want == "0":
        return None, None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        reason = f"torch is not importable by this build ({e})"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is built without CUDA"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            ext = CUDAExtension(
                "codequant.kernels.gpu._cq_gemv",
                # distinct stems: setuptools names each object after its source's stem
                sources=[os.path.join(CUDA_DIR, "cq_gemv_binding.cpp"), os.path.join(CUDA_DIR, "cq_gemv.cu")],
                depends=[os.path.join(CUDA_DIR, "cq_gemv.h")],
                include_dirs=[os.path.abspath(CUDA_DIR)],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
            # no ninja: its compile path bypasses the per-file hook that gives the CPU files their ISA flags
            return ext, BuildExtension.with_options(use_ninja=False)
    if want == "1":
        raise RuntimeError(f"CODEQUANT_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    print(f"codequant: CUDA kernels not built at install ({reason}); they compile on first use", file=sys.stderr)
    return None, None


cuda_ext, base_build_ext = cuda_build()


class BuildExt(base_build_ext or build_ext):
    """build_ext that adds each CPU source's instruction-set flags to its own compile command."""

    def build_extension(self, ext):
        if ext is not cpu_ext or not hasattr(self.compiler, "_compile"):  # MSVC: no per-file hook
            return super().build_extension(ext)
        compile_one = self.compiler._compile

        def compile_with_isa_flags(obj, src, src_ext, cc_args, extra_postargs, pp_opts):
            compile_one(obj, src, src_ext, cc_args, [*extra_postargs, *isa_flags(src)], pp_opts)

        self.compiler._compile = compile_with_isa_flags
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = compile_one


setup(ext_modules=[cpu_ext] + ([cuda_ext] if cuda_ext else []), cmdclass={"build_ext": BuildExt})
