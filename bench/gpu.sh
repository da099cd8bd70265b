#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) in one call of at most 8 minutes on a lent H100.
#
# The GPU machine has torch, transformers, msgpack and Pillow but no diffusers or pyzmq, and no
# network: their wheels travel with the working tree in .whl/ (ignored by git).
#   here, once (needs PyPI):   bench/gpu.sh --fetch-wheels
#   there, through the device tool:
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# Output: the tables, and $OUT/gpu-bench.log when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 pyzmq==27.3.0 importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer)

if [[ ${1:-} == --fetch-wheels ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    # The GPU machine's python3 is CPython 3.12 on x86-64 (KINDS.md).
    "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/server" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
log=${OUT:-/tmp}/gpu-bench.log
timeout 470 python3 -m bench.gpu "$@" 2>&1 | tee "$log"
