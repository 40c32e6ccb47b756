#!/usr/bin/env bash
# Fetches LibTorch from the PyPI torch wheel (the only source reachable offline-ish: PyPI) and
# prints the folder to pass as LIBTORCH when building `--features tch`.
#
#   scripts/libtorch.sh [cpu|cuda] [torch version]      (defaults: cpu 2.11.0)
#   export LIBTORCH=$(scripts/libtorch.sh cpu 2.11.0)
#   cargo build --release --features tch
#
# cpu:  a trimmed extract (~500 MB): headers, libtorch_cpu, libc10, libgomp, a stub libtorch.so
#       (the real one drags in libtorch_cuda) and the two CUDA runtime libraries libtorch_cpu
#       needs to load. Runs on any x86-64 Linux CPU.
# cuda: the whole torch/lib folder. The binary is linked with --allow-shlib-undefined and finds
#       CUDA at run time on the GPU machine; there run it with
#       LD_LIBRARY_PATH=$(python -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
#
# Build against the exact torch version of the machine that runs the binary: a binary built
# against 2.9 crashes on 2.11 (see ../shared/research/tch.md). tch 0.22 expects 2.9 but compiles
# against 2.11's headers; the version check is skipped because wheels carry no build-version file.
set -euo pipefail
mode=${1:-cpu}
version=${2:-2.11.0}
root=${EMBER_LIBTORCH_ROOT:-$(cd "$(dirname "$0")/.." && pwd)/.libtorch}
dest="$root/$mode-$version"
if [ -f "$dest/.complete" ]; then echo "$dest"; exit 0; fi

wheels="$root/wheels"
mkdir -p "$wheels"
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    --python-version 3.11 -d "$wheels" "$@" >&2
}
pip_download "torch==$version"
wheel=$(ls "$wheels"/torch-"$version"-*.whl | head -n 1)

rm -rf "$dest" && mkdir -p "$dest"
case "$mode" in
  cpu)
    unzip -q "$wheel" 'torch/include/*' 'torch/lib/libtorch_cpu.so' 'torch/lib/libc10.so' 'torch/lib/libgomp*' -d "$dest/x"
    mv "$dest/x/torch/include" "$dest/x/torch/lib" "$dest/" && rm -rf "$dest/x"
    echo 'void ember_libtorch_stub(void){}' | gcc -shared -fPIC -x c - -o "$dest/lib/libtorch.so" -Wl,-soname,libtorch.so
    # libtorch_cpu.so links libcudart and libcupti even for CPU work; take them from NVIDIA's wheels.
    cuda_major=$(unzip -p "$wheel" 'torch/version.py' | sed -n "s/^cuda[^=]*= '\([0-9]*\)\..*/\1/p")
    case "$cuda_major" in
      12) pip_download 'nvidia-cuda-runtime-cu12==12.8.90' 'nvidia-cuda-cupti-cu12==12.8.90' ;;
      13) pip_download 'nvidia-cuda-runtime==13.0.96.*' 'nvidia-cuda-cupti==13.0.85.*' ;;
      *) echo "libtorch.sh: torch $version uses CUDA '$cuda_major'; add its runtime wheels here" >&2; exit 2 ;;
    esac
    for w in "$wheels"/nvidia_cuda_*.whl; do
      # exit code 11: this wheel holds only one of the two libraries
      unzip -q -j -o "$w" "nvidia/*/libcudart.so.$cuda_major" "nvidia/*/libcupti.so.$cuda_major" -d "$dest/lib" || [ $? -eq 11 ]
    done
    for lib in libcudart libcupti; do
      [ -f "$dest/lib/$lib.so.$cuda_major" ] || { echo "libtorch.sh: $lib.so.$cuda_major not found in the NVIDIA wheels" >&2; exit 1; }
    done
    ;;
  cuda)
    unzip -q "$wheel" 'torch/include/*' 'torch/lib/*' -d "$dest/x"
    mv "$dest/x/torch/include" "$dest/x/torch/lib" "$dest/" && rm -rf "$dest/x"
    ;;
  *) echo "usage: $0 [cpu|cuda] [torch version]" >&2; exit 2 ;;
esac
touch "$dest/.complete"
echo "$dest"
