"""The build of the CPU extension (setup.py): each instruction-set file compiles with its own
flags under every compiler at hand, and exports nothing but its entry points, so no code
compiled for AVX2 / AVX-512 can be picked by the linker for the portable path."""

import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools

from tests.helpers.paths import REPO

CPU_DIR = REPO / "csrc" / "cpu"
# The only external symbols each instruction-set file may define (C++ mangled names).
EXPORTS = {
    "cq_avx2.cpp": {"_ZN2cq8isa_avx2E"},
    "cq_avx512.cpp": {"_ZN2cq10isa_avx512E"},
    "cq_avx512_vbmi.cpp": {"_ZN2cq17i8_rows_wide_vbmiERKNS_6WeightERKNS_4ActQEPflPKfll"},
}
COMPILERS = [c for c in ("g++", "clang++-16", "clang++") if shutil.which(c)]

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("nm"), reason="x86-64 with binutils")


@pytest.fixture(scope="module")
def setup_py(tmp_path_factory):
    """setup.py as a module, without running the build."""
    spec = importlib.util.spec_from_file_location("codequant_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    real = setuptools.setup
    setuptools.setup = lambda **kw: None
    try:
        spec.loader.exec_module(module)
    finally:
        setuptools.setup = real
    return module


def test_every_cpu_source_is_built_and_isa_files_have_flags(setup_py):
    built = {Path(s).name for s in setup_py.cpu_ext.sources}
    assert built == {p.name for p in CPU_DIR.glob("*.cpp")}
    assert set(setup_py.ISA_FLAGS) == set(EXPORTS)
    assert "-mavx512vbmi" in setup_py.isa_flags("csrc/cpu/cq_avx512_vbmi.cpp")
    assert "-mavx512vbmi" not in setup_py.isa_flags("csrc/cpu/cq_avx512.cpp")
    assert setup_py.isa_flags("csrc/cpu/cq_portable.cpp") == []


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("source", sorted(EXPORTS))
def test_isa_file_exports_only_its_entry_point(setup_py, compiler, source, tmp_path):
    # -O0 inlines nothing, so every header inline function or std template the file used would show up here
    flags = [f for f in setup_py.compile_args if not f.startswith("-O")] + ["-O0", "-Werror"]
    obj = tmp_path / "isa.o"
    subprocess.run([compiler, *flags, *setup_py.isa_flags(source), "-I", str(CPU_DIR), "-c", str(CPU_DIR / source), "-o", str(obj)],
                   check=True)
    nm = subprocess.run(["nm", "--defined-only", "--extern-only", str(obj)], check=True, capture_output=True, text=True).stdout
    # DW.ref.*: the exception-handling personality pointer (data, identical in every file)
    assert {line.split()[-1] for line in nm.splitlines() if " DW.ref." not in line} == EXPORTS[source]
