#!/usr/bin/env bash
# Build llama.cpp's perplexity and benchmark tools from the source PyPI ships (the llama.cpp tree
# vendored in the llama-cpp-python sdist), for benchmarks/llama_cpp.py. Benchmark only: nothing
# in awqfx or its tests needs llama.cpp.
#
#   bash scripts/llama-cpp.sh [DIR]     # default: $LLAMA_CPP_DIR or /work/llama-cpp
#   DIR/build/bin/llama-perplexity --help
#
# CPU build for this machine (GGML_NATIVE), no network code (LLAMA_CURL off), only the two tools.
set -euo pipefail
dir="${1:-${LLAMA_CPP_DIR:-/work/llama-cpp}}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
mkdir -p "$dir"
if [ ! -f "$dir/src/CMakeLists.txt" ]; then
  "$python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$dir/sdist" "llama-cpp-python==$version"
  rm -rf "$dir/src" && mkdir -p "$dir/src"
  tar xzf "$dir/sdist/llama_cpp_python-$version.tar.gz" -C "$dir/src" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp"
fi
cmake -S "$dir/src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > /dev/null
cmake --build "$dir/build" -j "$(nproc)" --target llama-perplexity llama-bench
"$dir/build/bin/llama-perplexity" --version 2>&1 | head -2
