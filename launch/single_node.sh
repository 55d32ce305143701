#!/usr/bin/env bash
# torchrun on one machine: launch/single_node.sh NPROC python-module [args...]
#   launch/single_node.sh 2 moba_megatron.demo --seq-len 8192
# NPROC defaults to the GPU count, or 2 CPU ranks (gloo) without GPUs. MAX_RESTARTS (default 0):
# how often torchrun restarts the workers after one dies (with --save D --load D they resume).
set -euo pipefail
source "$(dirname "$0")/env.sh"
NPROC="${1:?usage: single_node.sh NPROC MODULE [ARGS...]}"; shift
MODULE="${1:?usage: single_node.sh NPROC MODULE [ARGS...]}"; shift
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" -m "$MODULE" "$@"
