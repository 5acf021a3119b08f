#!/usr/bin/env bash
# Put into .whl/ (git-ignored) the wheels a lent GPU machine lacks (SPEC 8: Python 3.12 x86_64,
# torch 2.11, transformers 5.17, accelerate, peft, pyarrow, xxhash, fsspec, tensorboard,
# safetensors, matplotlib, pytest; no deepspeed, no datasets, no dill / multiprocess, no network).
# Run it HERE (it needs PyPI), then hand .whl/ to the device run with `carry: [".whl"]`;
# scripts/gpu_check.sh installs from it there. One version of each, the versions this repo's CI
# runs; <= 60 MB in all (the device run carries 64 MiB). Prints the total size.
#
#   bash scripts/gpu_wheels.sh [DIR]        # DIR defaults to .whl
#
# What is in the list: what the GPU image lacks (its package list of 2026-11-17 in
# /work/.library/device/KINDS.md: it has pandas, einops, msgpack, ninja, py-cpuinfo, psutil,
# huggingface-hub 1.33, pyarrow, xxhash, fsspec, but no pydantic); gpu_check.sh skips any wheel
# whose distribution is already there, so a package added to the image later costs only size:
#   deepspeed + hjson pydantic (+ pydantic-core annotated-types typing-inspection): deepspeed's
#     requirements the image lacks;
#   datasets + dill multiprocess: datasets' requirements the image lacks.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PYTHON="${PYTHON:-python}"
LIMIT_MB=60
# deepspeed is source-only on PyPI: build its (pure-Python, ops compiled on first use) wheel here.
# --no-build-isolation: its setup.py imports torch; an isolated build would download one.
DEEPSPEED="deepspeed==0.19.8"
BINARY=(
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
# The GPU machine's interpreter and platform, not this one's.
TARGET=(--python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any)

rm -rf "$DIR"
mkdir -p "$DIR"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DIR" "$DEEPSPEED"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" --dest "$DIR" "${BINARY[@]}"

count=$(find "$DIR" -type f -name '*.whl' | wc -l)
expected=$((1 + ${#BINARY[@]}))
if [ "$count" -ne "$expected" ]; then
    echo "gpu_wheels: $count wheels in $DIR, expected $expected (one per package)" >&2
    exit 1
fi
bytes=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"
echo "gpu_wheels: $count wheels, $((bytes / 1000000)) MB ($bytes bytes) in $DIR"
if [ "$bytes" -gt $((LIMIT_MB * 1000000)) ]; then
    echo "gpu_wheels: over the ${LIMIT_MB} MB limit" >&2
    exit 1
fi
