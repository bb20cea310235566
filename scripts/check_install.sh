#!/usr/bin/env bash
# CI checks of the build (.ci/run), from the repository root with the project venv made:
#  1. the CPU extension built with clang++-16 (when installed) passes the CPU kernel tests;
#  2. python -m build makes the sdist and, from it, the wheel; the wheel installed into a fresh
#     venv in a temporary directory passes scripts/smoke_install.py, run from there.
set -euo pipefail
PY=${PY:-.venv/bin/python}
if command -v clang++-16 >/dev/null; then
  echo "== CPU extension with clang-16"
  CC=clang-16 CXX=clang++-16 LDSHARED="clang-16 -shared" $PY setup.py -q build_ext --inplace --force 2>&1 | grep -v Warning || true
  readelf -p .comment src/codequant/kernels/cpu/_lut*.so | grep -q clang || { echo "_lut was not built by clang"; exit 1; }
  $PY -m pytest -q tests/kernels/test_cpu.py
  $PY setup.py -q build_ext --inplace --force 2>&1 | grep -v Warning || true  # back to the default compiler
else
  echo "== clang++-16 not installed: skipping the clang build (apt-get install clang-16)"
fi
echo "== sdist + wheel, installed into a fresh venv outside the checkout"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || { tail -30 "$tmp/build.log"; exit 1; }
ls "$tmp/dist"
tar tzf "$tmp"/dist/codequant-*.tar.gz >"$tmp/sdist.txt"
grep -q "src/codequant/kernels/gpu/csrc/cq_gemv.cu" "$tmp/sdist.txt" || { echo "the sdist lacks the CUDA sources"; exit 1; }
$PY -m venv "$tmp/venv"
# the dependencies (torch, transformers, ...) come from the project venv's site-packages (a plain path in a
# .pth: the .pth files there, among them the editable install's, are not read), codequant only from the wheel
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
purelib $PY > "$(purelib "$tmp/venv/bin/python")/deps.pth"
"$tmp/venv/bin/pip" install -q --no-deps "$tmp"/dist/codequant-*.whl
cp scripts/smoke_install.py "$tmp/"
(cd "$tmp" && "$tmp/venv/bin/python" smoke_install.py)
