#!/usr/bin/env bash
# Download here, where PyPI is reachable, the wheels that benchmarks/gpu_run.sh needs on the GPU machine,
# which has no network: Python 3.12, manylinux x86_64, --no-deps (every dependency is named below).
# Into .whl/ (ignored by git; the device tool's `carry: [".whl"]` takes it along), then print their
# size and the size of everything that travels against the device tool's 64 MiB limit.
#
#   benchmarks/gpu_wheels.sh
#
# What the GPU path imports, and why that is one build wheel and no runtime wheel: the image has torch
# (CUDA), triton, numpy, onnx, onnxscript, onnxruntime (CPU), pillow, safetensors, huggingface_hub,
# msgpack, typer and rich, which is everything twins-deploy imports to build the models, run the torch
# engines, bench, verify and export. onnxslim is never imported; openvino and nncf are imported only
# inside the OpenVINO engines, which the GPU path does not run; tensorrt and onnxruntime-gpu would add
# engines, but they are large CUDA builds (hundreds of MB), far over the limit. `pip install --no-deps`
# checks none of pyproject's dependencies, so their absence does not stop the install.
# The one wheel: setuptools, pyproject's build backend, which pip needs to build the project from the
# tree with --no-index (build isolation finds it in .whl/build); pinned so the build is the one tested here.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_WHEELS=("setuptools==84.2.1")
RUNTIME_WHEELS=()  # none: see above
LIMIT=$((64 * 1024 * 1024))

download() {  # download <folder> <requirement>...
    local folder=$1
    shift
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --dest "$folder" "$@"
}

rm -rf .whl
mkdir -p .whl/build
download .whl/build "${BUILD_WHEELS[@]}"
if ((${#RUNTIME_WHEELS[@]})); then
    download .whl "${RUNTIME_WHEELS[@]}"
fi

bytes_of() { xargs -0 -r stat -c %s 2>/dev/null | awk '{total += $1} END {print total + 0}'; }
wheels=$(find .whl -type f -print0 | bytes_of)
tree=$(git ls-files -z --cached --others --exclude-standard | bytes_of)  # what the device tool sends besides carry
total=$((wheels + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
find .whl -type f -name '*.whl' -printf '  %P  %s bytes\n'
echo ".whl/: $(mib "$wheels"); the tree (tracked + untracked, not ignored): $(mib "$tree"); together $(mib "$total") of the 64 MiB a device run carries"
if ((total > LIMIT)); then
    echo "over the limit: the device tool would refuse the run" >&2
    exit 1
fi
