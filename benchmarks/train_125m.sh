#!/usr/bin/env bash
# The 125M GPT at 32K context (configs/gpt-125m-32k.yaml), MoBA against full attention: same data,
# same steps, one GPU each, run side by side on two cards of one machine.
#
#   benchmarks/train_125m.sh OUTDIR [more moba-pretrain flags]
#   python benchmarks/plot_losses.py OUTDIR/moba.log OUTDIR/full.log --out benchmarks/loss_125m_32k.png
set -euo pipefail
out=${1:?usage: benchmarks/train_125m.sh OUTDIR [flags]}
shift
mkdir -p "$out"
source "$(dirname "$0")/../launch/env.sh"
trap "kill 0" TERM INT  # a stopped run stops both trainings
args=(--config configs/gpt-125m-32k.yaml --train-iters "${ITERS:-100}" --global-batch-size "${GBS:-2}"
      --log-interval 5 --lr-warmup-iters 10 "$@")
CUDA_VISIBLE_DEVICES=${MOBA_GPU:-0} python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m moba_megatron.pretrain "${args[@]}" \
    > "$out/moba.log" 2>&1 &
CUDA_VISIBLE_DEVICES=${FULL_GPU:-1} python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m moba_megatron.pretrain "${args[@]}" \
    --moba-disable > "$out/full.log" 2>&1 &
wait
