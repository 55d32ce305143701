#!/usr/bin/env bash
# The whole test suite (GPU tests are skipped without CUDA).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q "$@"
