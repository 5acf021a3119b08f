#!/bin/bash
# Multi-node training under SLURM: one torchrun per node, one process per GPU, rendezvous on
# the first node. Submit from the repository root:
#   sbatch scripts/slurm_train.sh configs/polar_7b_zero2.yaml model.path=POLAR-7B-Base data.train_files=train.jsonl
# Resubmitting the same command continues from the latest checkpoint (checkpoint.resume=auto).
#
#SBATCH --job-name=polar-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
# 10 minutes before the time limit, SLURM sends SIGTERM to every process of the step: each rank
# finishes its optimizer step, the run saves a checkpoint and stops (exit 0). torchrun itself
# exits non-zero on that signal; the checkpoint is complete all the same.
#SBATCH --signal=TERM@600

set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch $0 CONFIG [key=value ...]" >&2; exit 2; }

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
# DeepSpeed's checkpoint save must finish before torchrun kills its workers after a SIGTERM
# (default 30 s; recent torch reads this variable, older versions ignore it).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# A rank stuck in a collective (a dead peer on another node) fails after
# deepspeed.timeout_minutes instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --max-restarts 0 \
    -m polar_train train "$@"
