#!/usr/bin/env bash
# The main job: the tiny MoBA GPT pretraining run under torchrun, 2 CPU ranks with gloo
# (one rank per GPU with NCCL where GPUs are present). Extra flags go to moba-pretrain.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
exec bash launch/single_node.sh "$NPROC" moba_megatron.pretrain --config configs/tiny-cpu.yaml "$@"
