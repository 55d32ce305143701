#!/usr/bin/env bash
# The retrieval study on one GPU: the 125M config (configs/gpt-125m-32k.yaml) taught the synthetic
# task's retrieval on a dense base, then each variant fine-tuned at 32K from that one base and put
# through the needle grid; at the end the summary (benchmarks/needle_summary.py): one table, the
# heatmaps side by side (OUTDIR/heatmaps.png), the loss by position at 32K (OUTDIR/position_loss.png).
#
#   benchmarks/needle_125m.sh OUTDIR VARIANT...      # no VARIANT: the base and its stages alone
#
# A variant is `full` (--moba-disable), `moba` (the config's MoBA, 2048 / 3 with layer 12 full, to the
# end: the config's last phase on full attention is for its own train_iters) or
# `moba:CHUNK:TOPK`, followed by any of `:conv=W` (--moba-key-conv W), `:steps=N` (N steps at 32K
# instead of LONG_ITERS), `:full-from=N` (--moba-full-attn-from-iter N) and `:seed=N` (the fine-tune's
# --seed: its data order; the needle probes stay the same, so seeds of one variant show the run-to-run
# spread): for example `moba:128:48:conv=3:steps=800:full-from=700`, `full:seed=2`.
# Results go to OUTDIR/NAME, NAME the variant with `-`
# for `:` and without `=` (moba-128-48-conv3-steps800-full-from700), with NAME/variant.json: how it ran (side by side
# or alone, evaluated on MoBA or on full attention), for the summary. A variant that ends on full attention
# (`:full-from=N`) is evaluated so, and with its MoBA too, in OUTDIR/NAME-as-moba (MOBA_EVAL=0: on full
# attention only, a minute less a variant).
#
# Why the stages (benchmarks/RESULTS.md, "Retrieval quality"): the 125M model forms an induction head (the
# loss drops abruptly) with dense needles and a small vocabulary: 64 tokens, 8 needles, vocabulary 64, after
# 500-2000 steps; with vocabulary 2048, not in 3200. Each 4-8x lengthening then regains retrieval within a
# few hundred steps. The vocabulary fixes the key range (the task takes max(pairs, (vocab - 3) // 8) keys),
# so every stage keeps 8 needles. The base and its stages take about 5 minutes on one H200; a base already in
# RUNS (default OUTDIR/checkpoints) is reused, so a study can span several machine calls.
# Step counts: BASE_ITERS (2000), STAGE_ITERS (300 at each stage), LONG_ITERS (200 at 32K); SAMPLES (24) probes a
# cell. CONFIG, STAGES and LENGTHS (of the needle grid) change the model, the lengthening and the grid (on CPU
# with CONFIG=configs/tiny-cpu.yaml). CHECKS=0 skips the check after each stage (about 20 s each). Variants run
# one after the other, so each fine-tune's step time is its own; PARALLEL=1 runs them side by side instead
# (less wall time, shared step times). SELECTION_TILES=N,... has each evaluation on MoBA first write how much
# the gate's selections overlap within tiles of N queries (OUTDIR/NAME/selection.json, needle --selection-tiles).
set -euo pipefail
usage="usage: benchmarks/needle_125m.sh OUTDIR VARIANT... (full, moba, moba:CHUNK:TOPK[:conv=W][:steps=N][:full-from=N][:seed=N])"
out=${1:?$usage}
shift
variant_re='^(full|moba(:[0-9]+:[0-9]+)?)(:conv=[0-9]+|:steps=[0-9]+|:full-from=[0-9]+|:seed=[0-9]+)*$'
for variant in "$@"; do
    [[ $variant =~ $variant_re ]] || { echo "needle_125m.sh: cannot parse variant '$variant': $usage" >&2; exit 2; }
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

stages=(${STAGES:-512:32 4096:4})  # LENGTH:SEQUENCES, 16K tokens a step (one MoBA block: full attention is the same)
last=s${stages[-1]%:*}
if [ -f "$runs/$last/latest_checkpointed_iteration.txt" ]; then
    log "base: reusing $runs/$last"
else
    log "base: 64 tokens, 256 sequences a step, full attention"
    job base moba_megatron.pretrain "${task[@]}" --seq-length 64 --micro-batch-size 256 --global-batch-size 256 \
        --moba-disable --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 100 --train-iters "${BASE_ITERS:-2000}" --log-interval 200 \
        --save "$runs/s64"
    check 64 s64
    previous=s64
    for stage in "${stages[@]}"; do
        length=${stage%:*} micro=${stage#*:}
        log "$length tokens"
        job "s$length" moba_megatron.pretrain "${task[@]}" --load "$runs/$previous" --finetune --save "$runs/s$length" \
            --moba-disable --seq-length "$length" --micro-batch-size "$micro" --global-batch-size "$micro" \
            --lr 5e-4 --min-lr 5e-4 --lr-warmup-iters 10 --train-iters "${STAGE_ITERS:-300}" --log-interval 50
        check "$length" "s$length"
        previous=s$length
    done
fi
evaluate() {  # NAME ATTENTION TRAINED FLAGS...: the needle grid of checkpoint TRAINED into OUTDIR/NAME
    local name=$1 attention=$2 trained=$3
    shift 3
    mkdir -p "$out/$name"  # how it ran, for the summary: its step time is its own unless side by side
    printf '{"trained_as": "%s", "side_by_side": %s, "eval_attention": "%s"}\n' "$trained" \
        "$([ "${PARALLEL:-0}" = 1 ] && echo true || echo false)" "$attention" > "$out/$name/variant.json"
    local overlap=()  # SELECTION_TILES=64,128: MoBA evaluations first measure the gate's overlap in query tiles
    [ "$attention" = full ] || [ -z "${SELECTION_TILES:-}" ] || overlap=(--selection-tiles "$SELECTION_TILES")
    job "$name-eval" moba_megatron.eval.needle "${task[@]}" "$@" "${overlap[@]}" --load "$runs/$trained" --token-losses 2 \
        --lengths "${LENGTHS:-4096,8192,16384,32768}" --depths 0,0.25,0.5,0.75,1 --samples "${SAMPLES:-24}" \
        --out "$out/$name"
}
long() {  # VARIANT: fine-tune at the config's length, then the needle grid
    local name flags=() phase=() train_flags=() iters=${LONG_ITERS:-200} part parts
    IFS=: read -r -a parts <<< "$1"
    name=${1//:/-}
    name=${name//=/}
    case ${parts[0]} in
        full) flags=(--moba-disable) ;;
    esac
    if [[ ${parts[1]:-} =~ ^[0-9]+$ ]]; then
        flags+=(--moba-chunk-size "${parts[1]}" --moba-topk "${parts[2]}")
    fi
    for part in "${parts[@]:1}"; do
        case $part in
            conv=*) flags+=(--moba-key-conv "${part#conv=}") ;;
            steps=*) iters=${part#steps=} ;;
            full-from=*) phase=(--moba-full-attn-from-iter "${part#full-from=}") ;;
            seed=*) train_flags+=(--seed "${part#seed=}") ;;
        esac
    done
    # The config's own last phase (moba_full_attn_from_iter) is for its train_iters: a variant without
    # :full-from= stays on its attention to the end.
    [ ${#phase[@]} -gt 0 ] || train_flags+=(--moba-full-attn-from-iter "$((iters + 1))")
    log "$name at the config's length, $iters steps"
    job "$name" moba_megatron.pretrain "${task[@]}" "${flags[@]}" "${phase[@]}" "${train_flags[@]}" --load "$runs/$last" \
        --finetune --save "$runs/$name" --micro-batch-size 1 --global-batch-size 2 --lr 3e-4 --min-lr 3e-4 \
        --lr-warmup-iters 10 --train-iters "$iters" --log-interval 20
    if [ ${#phase[@]} -gt 0 ]; then  # it ended on full attention: evaluated so, and with its MoBA as well
        evaluate "$name" full "$name" "${flags[@]}" --moba-disable
        [ "${MOBA_EVAL:-1}" = 0 ] || evaluate "$name-as-moba" moba "$name" "${flags[@]}"
    else
        evaluate "$name" "$([ "${parts[0]}" = full ] && echo full || echo moba)" "$name" "${flags[@]}"
    fi
}
if [ "${PARALLEL:-0}" = 1 ]; then  # the variants side by side on the one GPU: less wall time, their step times shared
    pids=()
    for variant in "$@"; do long "$variant" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done
else
    for variant in "$@"; do long "$variant"; done
fi
[ $# -eq 0 ] || python3 "$(dirname "$0")/needle_summary.py" "$out" | tee -a "$out/log.txt"
log done
