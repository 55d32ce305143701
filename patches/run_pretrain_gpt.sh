#!/usr/bin/env bash
# Upstream Megatron-LM's own pretrain_gpt.py with MoBA layers, against the same run with its dense
# local layers: mock data, no Transformer Engine or apex.
#
#   patches/run_pretrain_gpt.sh MEGATRON_LM_DIR OUTDIR [more pretrain_gpt.py flags]
#
# MEGATRON_LM_DIR is a Megatron-LM checkout at tag core_v0.19.0 with both patches applied
# (patches/README.md); moba_megatron must be importable (pip install -e . or PYTHONPATH).
# ITERS (default 30), SEQ (default 16384), LAYERS (default 4) and NPROC (default 1) shape the run.
set -euo pipefail
mlm=${1:?usage: patches/run_pretrain_gpt.sh MEGATRON_LM_DIR OUTDIR [flags]}
out=${2:?usage: patches/run_pretrain_gpt.sh MEGATRON_LM_DIR OUTDIR [flags]}
shift 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
seq=${SEQ:-16384}
common=(
    --transformer-impl local --no-rope-fusion --no-gradient-accumulation-fusion
    --no-masked-softmax-fusion --no-persist-layer-norm --attention-dropout 0 --hidden-dropout 0
    --num-layers "${LAYERS:-4}" --hidden-size 768 --num-attention-heads 12 --ffn-hidden-size 3072
    --seq-length "$seq" --max-position-embeddings "$seq" --position-embedding-type rope
    --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --micro-batch-size 1 --global-batch-size "${NPROC:-1}" --train-iters "${ITERS:-30}"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 5 --clip-grad 1.0 --bf16
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
    --log-interval 1 --eval-iters 0 --eval-interval 1000000 --log-throughput
)
moba=(--spec moba_megatron.megatron.specs moba_layer_local_spec
      --moba-chunk-size "${CHUNK:-2048}" --moba-topk "${TOPK:-3}")
cd "$mlm"
run() {
    python3 -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-1}" pretrain_gpt.py "${common[@]}" "$@"
}
run "${moba[@]}" "$@" 2>&1 | tee "$out/moba.log"
run "$@" 2>&1 | tee "$out/dense.log"
