#!/usr/bin/env bash
# The one command for a lent GPU machine (SPEC 8), under 9 minutes: installs the wheels of .whl/
# it lacks (made here by scripts/gpu_wheels.sh), runs the CUDA tests, benchmarks the polar-1.8b
# and polar-7b shapes (padded vs packed vs packed + shared prefix, bf16, MFU) and 5 steps of
# DeepSpeed ZeRO-2 training, the longest one pair that trains at train.sequence_parallel=1 on the
# one GPU (stage long_sp1: 32k..256k tokens, polar-1.8b shape; SP > 1 needs several GPUs and is
# not run here), and writes $OUT/gpu_check.json and $OUT/gpu_check.log
# (OUT defaults to ./gpu_out). Stages and budgets: scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh              # there: the device run, with carry [".whl"]
#   bash scripts/gpu_check.sh --dry-run    # here: the same stages on CPU, tiny shapes (CI runs it)
#
# Exit status 0 when every stage passed; a failed stage is in the summary, never fatal to the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" scripts/gpu_check.py "$@"
