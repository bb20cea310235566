#!/usr/bin/env bash
# Build llama.cpp (vendored in the llama-cpp-python sdist from PyPI) into benchmarks/_build/
# (gitignored; nothing of llama.cpp is committed) and print the path of what was asked for:
#   benchmarks/llamacpp/build.sh [version]               the ggml_mul_mat timing harness (ggml_bench.cpp)
#   benchmarks/llamacpp/build.sh [version] llama-bench   llama.cpp's end-to-end timer, llama-bench
set -euo pipefail
VERSION="${1:-0.3.36}"
WHAT="${2:-ggml_bench}"
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
JOBS="$(( $(nproc) < 2 ? $(nproc) : 2 ))"
configure() {
  # From llama.cpp's top level (ggml alone needs files the sdist leaves out). The tools and
  # their common library are configured (llama-bench needs both) but only the targets asked
  # for are built.
  cmake -S "$SRC/vendor/llama.cpp" -B "$OUT" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DGGML_CPU_REPACK=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
}
case "$WHAT" in
  llama-bench)
    if [ ! -x "$OUT/bin/llama-bench" ]; then
      configure
      cmake --build "$OUT" -j "$JOBS" --target llama-bench >&2
    fi
    echo "$OUT/bin/llama-bench" ;;
  ggml_bench)
    if [ -z "$(find "$OUT" -name 'libggml-cpu.a' 2>/dev/null)" ]; then
      configure
      cmake --build "$OUT" -j "$JOBS" --target ggml-cpu ggml-base ggml >&2
    fi
    LIBS="$(find "$OUT" -name 'libggml.a') $(find "$OUT" -name 'libggml-cpu.a') $(find "$OUT" -name 'libggml-base.a')"
    g++ -O2 -std=c++17 -march=native -I"$GGML/include" "$HERE/ggml_bench.cpp" $LIBS -fopenmp -lpthread -lm -o "$OUT/ggml_bench" >&2
    echo "$OUT/ggml_bench" ;;
  *) echo "unknown target $WHAT (ggml_bench or llama-bench)" >&2; exit 2 ;;
esac
