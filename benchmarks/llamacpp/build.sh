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
if [ -z "$(find "$OUT" -name 'libggml-cpu.a' 2>/dev/null)" ]; then
  # Configure from llama.cpp's top level (ggml alone needs files the sdist leaves out);
  # only the ggml libraries are built.
  cmake -S "$SRC/vendor/llama.cpp" -B "$OUT" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DGGML_CPU_REPACK=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
  cmake --build "$OUT" -j "$(nproc)" --target ggml-cpu ggml-base ggml >&2
fi
LIBS="$(find "$OUT" -name 'libggml.a') $(find "$OUT" -name 'libggml-cpu.a') $(find "$OUT" -name 'libggml-base.a')"
g++ -O2 -std=c++17 -march=native -I"$GGML/include" "$HERE/ggml_bench.cpp" $LIBS -fopenmp -lpthread -lm -o "$OUT/ggml_bench" >&2
echo "$OUT/ggml_bench"
