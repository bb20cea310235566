#!/usr/bin/env bash
# Build llama.cpp's ggml (vendored in the llama-cpp-python sdist from PyPI) and the
# ggml_mul_mat timing harness, into benchmarks/_build/ (gitignored; nothing of llama.cpp
# is committed). Usage: benchmarks/llamacpp/build.sh [version]   -> prints the harness path
set -euo pipefail
VERSION="${1:-0.3.36}"
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD="$(cd "$HERE/.." && pwd)/_build"
SRC="$BUILD/llama_cpp_python-$VERSION"
GGML="$SRC/vendor/llama.cpp/ggml"
mkdir -p "$BUILD"
if [ ! -d "$GGML" ]; then
  if [ ! -f "$BUILD/llama_cpp_python-$VERSION.tar.gz" ]; then
    python -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$BUILD" >&2
  fi
  tar -xzf "$BUILD/llama_cpp_python-$VERSION.tar.gz" -C "$BUILD"
fi
OUT="$BUILD/ggml-$VERSION"
if [ ! -f "$OUT/src/libggml-cpu.a" ]; then
  cmake -S "$GGML" -B "$OUT" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DGGML_CPU_REPACK=ON -DGGML_OPENMP=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF >&2
  cmake --build "$OUT" -j "$(nproc)" --target ggml-cpu ggml-base ggml >&2
fi
LIBS="$(find "$OUT" -name 'libggml.a') $(find "$OUT" -name 'libggml-cpu.a') $(find "$OUT" -name 'libggml-base.a')"
g++ -O2 -std=c++17 -march=native -I"$GGML/include" "$HERE/ggml_bench.cpp" $LIBS -fopenmp -lpthread -lm -o "$OUT/ggml_bench" >&2
echo "$OUT/ggml_bench"
