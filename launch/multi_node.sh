#!/usr/bin/env bash
# torchrun across machines with plain c10d rendezvous. Run the same line on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multi_node.sh 8 MODULE [ARGS...]
# MAX_RESTARTS (default 0): worker restarts torchrun makes (resume with --save D --load D).
set -euo pipefail
source "$(dirname "$0")/env.sh"
NPROC="${1:?usage: multi_node.sh NPROC_PER_NODE MODULE [ARGS...]}"; shift
MODULE="${1:?usage: multi_node.sh NPROC_PER_NODE MODULE [ARGS...]}"; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-moba}" \
    --max-restarts "${MAX_RESTARTS:-0}" -m "$MODULE" "$@"
