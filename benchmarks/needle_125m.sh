#!/usr/bin/env bash
# The needle eval's GPU run: the 125M config (configs/gpt-125m-32k.yaml) taught the synthetic task's
# retrieval at 32K, then the needle grid for MoBA (the config: 2048 / 3, layer 12 full) and/or full
# attention, each fine-tuned at 32K from one shared base.
#
#   benchmarks/needle_125m.sh OUTDIR moba [full] [moba:CHUNK:TOPK ...]
#
# moba is the config's MoBA; moba:512:8 the same model fine-tuned and evaluated with --moba-chunk-size 512
# --moba-topk 8 (results in OUTDIR/moba-512-8); full is --moba-disable.
# Why the stages (benchmarks/RESULTS.md, "Retrieval quality"): the 125M model forms an induction head (the
# loss drops abruptly) with dense needles and a small vocabulary: 64 tokens, 8 needles, vocabulary 64, after
# 500-2000 steps; with vocabulary 2048, not in 3200. Each 4-8x lengthening then regains retrieval within a
# few hundred steps. The vocabulary fixes the key range (the task takes max(pairs, (vocab - 3) // 8) keys),
# so every stage keeps 8 needles. The retrieval-quality table comes from
#   CHECKS=0 PARALLEL=1 BASE_ITERS=2000 STAGE_ITERS=300 LONG_ITERS=200 benchmarks/needle_125m.sh OUT moba full
# (8.5 minutes on one H200). CHECKS=0 skips the check after each stage (about 20 s each).
# Step counts: BASE_ITERS (2000), STAGE_ITERS (300 at each stage), LONG_ITERS (200 at 32K). CONFIG, STAGES
# and LENGTHS (of the needle grid) change the model, the lengthening and the grid (on CPU with CONFIG=configs/tiny-cpu.yaml).
# PARALLEL=1 fine-tunes the variants at once on the one GPU (their step times then overlap).
set -euo pipefail
out=${1:?usage: benchmarks/needle_125m.sh OUTDIR moba [full] [moba:CHUNK:TOPK ...]}
shift
[ $# -gt 0 ] || set -- moba full
for variant in "$@"; do
    [[ $variant =~ ^(moba|full|moba:[0-9]+:[0-9]+)$ ]] || { echo "unknown variant $variant (moba, full or moba:CHUNK:TOPK)"; exit 2; }
done
source "$(dirname "$0")/../launch/env.sh"
runs=${RUNS:-$out/checkpoints}
mkdir -p "$out" "$runs"
task=(--config "${CONFIG:-configs/gpt-125m-32k.yaml}" --vocab-size 64 --retrieval-pairs 8 --eval-iters 0)  # no validation loss: the needle eval measures
log() { echo "$(date +%T) $*" | tee -a "$out/log.txt"; }
job() {  # NAME MODULE ARGS: a one-GPU job; its progress lines into the log; a failure stops the run with its output's tail
    local name=$1 status=0
    shift
    python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m "$@" > "$out/job-$name.log" 2>&1 || status=$?
    grep -E "iteration .*lm loss|saved|exiting|rror|^needle" "$out/job-$name.log" | cut -c1-200 | sed "s/^/$name: /" \
        | tee -a "$out/log.txt" || true
    [ "$status" = 0 ] || { tail -n 20 "$out/job-$name.log"; exit "$status"; }
}

check() {  # LENGTH CHECKPOINT: the loss by kind of token at that length and one needle cell, to see where retrieval goes
    [ "${CHECKS:-1}" = 1 ] || return 0
    local samples=$((16384 / $1)); samples=$((samples > 32 ? 32 : samples < 2 ? 2 : samples))
    job "check$1" moba_megatron.eval.needle "${task[@]}" --moba-disable --load "$runs/$2" --seq-length "$1" --token-losses "$samples" \
        --lengths "$1" --depths 0.5 --samples 4 --out "$out/check$1"
}

log "base: 64 tokens, 256 sequences a step, full attention"
job base moba_megatron.pretrain "${task[@]}" --seq-length 64 --micro-batch-size 256 --global-batch-size 256 --moba-disable \
    --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 100 --train-iters "${BASE_ITERS:-2000}" --log-interval 200 --save "$runs/s64"
check 64 s64
previous=s64
for stage in ${STAGES:-512:32 4096:4}; do  # LENGTH:SEQUENCES, 16K tokens a step (one MoBA block: full attention is the same)
    length=${stage%:*} micro=${stage#*:}
    log "$length tokens"
    job "s$length" moba_megatron.pretrain "${task[@]}" --load "$runs/$previous" --finetune --save "$runs/s$length" --moba-disable \
        --seq-length "$length" --micro-batch-size "$micro" --global-batch-size "$micro" \
        --lr 5e-4 --min-lr 5e-4 --lr-warmup-iters 10 --train-iters "${STAGE_ITERS:-300}" --log-interval 50
    check "$length" "s$length"
    previous=s$length
done
long() {  # VARIANT: fine-tune at the config's length, then the needle grid
    local name=$1 flags=() chunk topk
    case $1 in
        full) flags=(--moba-disable) ;;
        moba:*) IFS=: read -r _ chunk topk <<< "$1"; name=moba-$chunk-$topk; flags=(--moba-chunk-size "$chunk" --moba-topk "$topk") ;;
    esac
    log "$name at the config's length"
    job "$name" moba_megatron.pretrain "${task[@]}" "${flags[@]}" --load "$runs/$previous" --finetune --save "$runs/$name" \
        --micro-batch-size 1 --global-batch-size 2 --lr 3e-4 --min-lr 3e-4 --lr-warmup-iters 10 \
        --train-iters "${LONG_ITERS:-200}" --log-interval 20
    job "$name-eval" moba_megatron.eval.needle "${task[@]}" "${flags[@]}" --load "$runs/$name" --token-losses 2 \
        --lengths "${LENGTHS:-4096,8192,16384,32768}" --depths 0,0.25,0.5,0.75,1 --samples 6 --out "$out/$name"
}
if [ "${PARALLEL:-0}" = 1 ]; then  # the variants side by side on the one GPU: less wall time, their step times shared
    pids=()
    for variant in "$@"; do long "$variant" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
else
    for variant in "$@"; do long "$variant"; done
fi
log done
