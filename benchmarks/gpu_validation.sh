#!/usr/bin/env bash
# The multi-GPU validation runs (benchmarks/RESULTS.md), in parts of at most 10 minutes each:
#
#   benchmarks/gpu_validation.sh OUTDIR cp4-bench       # 4 GPUs: bench_cp at CP 1, 2 and 4, both exchange modes
#   benchmarks/gpu_validation.sh OUTDIR cp4-tests       # 4 GPUs: CP op vs single device at CP 2, CP 4 and TP 2 x CP 2
#   benchmarks/gpu_validation.sh OUTDIR tp2cp2-correctness  # 4 GPUs: TP 2 x CP 2, the 8-GPU correctness settings at 1M
#   benchmarks/gpu_validation.sh OUTDIR tp2cp2-moba     # 4 GPUs: the 8-GPU job's config at TP 2 x CP 2 (1M)
#   benchmarks/gpu_validation.sh OUTDIR tp2cp2-full     # the same with --moba-disable
#   benchmarks/gpu_validation.sh OUTDIR 8gpu-correctness  # 8 GPUs: TP 2 x CP 4, 1M tokens, block 4096, top-k 12, GQA, bf16
#   benchmarks/gpu_validation.sh OUTDIR 8gpu-moba       # 8 GPUs: configs/llama3-8b-2layer-1m.yaml (TP 2 x CP 4, 1M)
#   benchmarks/gpu_validation.sh OUTDIR 8gpu-full       # the same with --moba-disable
#
# Each writes OUTDIR/PART.log (cp4-bench also OUTDIR/cp.json); the job logs carry tokens/s, TFLOP/s
# per GPU and rank 0's peak memory. Extra flags after PART go to the job or to bench_cp (full attention
# at 1M on 4 H200s takes about a minute a step: add --train-iters 5 to tp2cp2-full to keep it short).
set -euo pipefail
parts="cp4-bench|cp4-tests|tp2cp2-correctness|tp2cp2-moba|tp2cp2-full|8gpu-correctness|8gpu-moba|8gpu-full"
usage="usage: benchmarks/gpu_validation.sh OUTDIR $parts [flags]"
out=${1:?$usage}
part=${2:?$usage}
shift 2
case "|$parts|" in *"|$part|"*) ;; *) echo "$usage" >&2; exit 2 ;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
source launch/env.sh
export PYTHONPATH=".:${PYTHONPATH:-}"
nvidia-smi -L > "$out/gpus.txt"
job=(python3 -m torch.distributed.run --standalone --nproc-per-node 8 -m moba_megatron.pretrain
     --config configs/llama3-8b-2layer-1m.yaml)
half=(python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m moba_megatron.pretrain
      --config configs/llama3-8b-2layer-1m.yaml --tensor-model-parallel-size 2 --context-parallel-size 2)
case "$part" in
    cp4-bench) python3 -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/bench_cp.py \
                   --out "$out/cp.json" "$@" > "$out/$part.log" 2>&1 ;;
    cp4-tests) python3 -m pytest -q -rs tests/gpu/test_cp_gpu.py -k "matches_single_device" > "$out/$part.log" 2>&1 ;;
    tp2cp2-correctness) python3 -m pytest -q -rs tests/gpu/test_cp_gpu.py -k "1m_tokens and 2-2" > "$out/$part.log" 2>&1 ;;
    tp2cp2-moba) "${half[@]}" "$@" > "$out/$part.log" 2>&1 ;;
    tp2cp2-full) "${half[@]}" --moba-disable "$@" > "$out/$part.log" 2>&1 ;;
    8gpu-correctness) python3 -m pytest -q -rs tests/gpu/test_cp_gpu.py -k "1m_tokens and 4-2" > "$out/$part.log" 2>&1 ;;
    8gpu-moba) "${job[@]}" "$@" > "$out/$part.log" 2>&1 ;;
    8gpu-full) "${job[@]}" --moba-disable "$@" > "$out/$part.log" 2>&1 ;;
esac
