#!/usr/bin/env bash
# The main job. Until the pretraining entry point lands: the CPU MoBA demo.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m moba_megatron.demo "$@"
