#!/usr/bin/env bash
# The Python packages megatrain needs on a GPU machine whose image has PyTorch with CUDA but not
# these (Python 3.12, x86-64; the H200 image this project is lent has everything else): DeepSpeed
# and its two needs it lacks. Run where pip reaches PyPI:
#     bash bench/gpu_wheels.sh [DIR]          (default .whl, ignored by git)
# then, on the GPU machine, before bench/gpu_check.sh:
#     python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#     export PYTHONPATH=/tmp/site
set -euo pipefail
out="${1:-.whl}"
mkdir -p "$out"
# DeepSpeed ships only a source package; with its ops left to build on first use (JIT, with
# TORCH_CUDA_ARCH_LIST), the wheel is pure Python.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5
ls -1 "$out"
