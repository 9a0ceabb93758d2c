#!/usr/bin/env bash
# The GPU acceptance check, in one command, on a machine with one NVIDIA GPU:
#     bash bench/gpu_check.sh
# Prints one JSON line per check (PASS / FAIL / SKIP with its figures) and exits 1 if any failed;
# see bench/gpu_check.py for the checks and bench/README.md for installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # megatrain from this checkout
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # DeepSpeed's JIT ops: Hopper
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export WANDB_MODE=disabled OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
