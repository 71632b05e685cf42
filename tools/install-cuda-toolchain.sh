#!/usr/bin/env bash
# Installs the pinned CUDA compiler (nvcc 13.0 from NVIDIA's Python wheels) into a cache
# folder outside the clone, so that build.rs can compile kernels/*.cu on a machine
# without a GPU. CUDA 13.0 matches the GPU machines' driver 580: a newer NVVM emits PTX
# that driver rejects (see ../shared/gpu-workflow.md).
#
# Usage: tools/install-cuda-toolchain.sh        prints the nvcc path on its last line
# Cache: $RLN_CUDA_CACHE (default ~/.cache/rln-engine/cuda-13.0)
set -euo pipefail
cache="${RLN_CUDA_CACHE:-$HOME/.cache/rln-engine/cuda-13.0}"
nvcc="$cache/venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  mkdir -p "$cache"
  python3 -m venv "$cache/venv" >&2
  "$cache/venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" >&2
  # the venv's python may be another minor version: find nvcc wherever pip put it
  nvcc=$(find "$cache/venv" -path '*nvidia/cu13/bin/nvcc' -type f | head -n 1)
fi
[ -x "$nvcc" ] || { echo "install-cuda-toolchain: nvcc not found after install" >&2; exit 1; }
echo "$nvcc"
