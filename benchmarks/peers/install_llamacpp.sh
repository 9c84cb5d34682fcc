#!/usr/bin/env bash
# llama.cpp (through llama-cpp-python 0.3.36, built from source for this CPU) in its own virtual environment,
# never a dependency of this project, never in CI.
#   bash benchmarks/peers/install_llamacpp.sh [DIR]     default DIR: ~/peers/llamacpp   (~15-25 minutes on 2 cores)
# Leaves in DIR:
#   venv/                  python with llama_cpp (native -march build), gguf, torch (CPU wheel), transformers
#   src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py   the converter of the vendored llama.cpp
#   build/bin/llama-bench, build/bin/llama-batched-bench                 llama.cpp's own benchmark tools
# One compile of ggml/llama serves both: the wheel is built in a kept build folder (no build isolation, so the
# CMake cache points at this venv's ninja), which is then reconfigured with the tools on and builds two targets.
set -euo pipefail
DIR=${1:-$HOME/peers/llamacpp}
VERSION=0.3.36
JOBS=${JOBS:-$(nproc)}
mkdir -p "$DIR/src"
VENV=$DIR/venv
SRC=$DIR/src/llama_cpp_python-$VERSION
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
if [ ! -d "$SRC" ]; then
    "$PIP" download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR/src"
    tar xzf "$DIR/src/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/src"
fi
# The converter's needs. torch: the CPU build only (a CUDA wheel is gigabytes and useless here).
"$PIP" install -q "torch==2.13.0+cpu" 2>/dev/null || "$PIP" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$PIP" install -q "numpy<2.5" sentencepiece "protobuf>=4.21,<5" "transformers==5.24.0" safetensors \
    "scikit-build-core[pyproject]>=0.9.2" ninja
"$PIP" install -q "$SRC/vendor/llama.cpp/gguf-py"
# The binding, compiled for this machine's CPU (-march=native); mtmd (vision) is not needed.
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
    "$PIP" install -v --no-build-isolation --config-settings=build-dir="$DIR/build" "$SRC" > "$DIR/build.log" 2>&1 \
    || { tail -40 "$DIR/build.log"; exit 1; }
# llama-bench and llama-batched-bench from the same build folder: only the tools and their links compile anew.
PATH="$VENV/bin:$PATH" cmake -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF "$DIR/build" >> "$DIR/build.log" 2>&1
PATH="$VENV/bin:$PATH" cmake --build "$DIR/build" --target llama-bench llama-batched-bench -j "$JOBS" >> "$DIR/build.log" 2>&1 \
    || { tail -40 "$DIR/build.log"; exit 1; }
mkdir -p "$DIR/build/bin"
for tool in llama-bench llama-batched-bench; do
    [ -x "$DIR/build/bin/$tool" ] || cp "$(find "$DIR/build" -name "$tool" -type f -perm -u+x | head -1)" "$DIR/build/bin/"
done
"$VENV/bin/python" -c "import llama_cpp, torch, gguf; print('llama_cpp', llama_cpp.__version__, 'torch', torch.__version__)"
"$DIR/build/bin/llama-bench" --help > /dev/null && echo "llama-bench ok"
"$DIR/build/bin/llama-batched-bench" --help > /dev/null 2>&1 && echo "llama-batched-bench ok"
