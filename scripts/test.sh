#!/usr/bin/env bash
# Lint (ruff), then the whole test suite (GPU tests are skipped without CUDA). Arguments go to
# pytest: `bash scripts/test.sh -m "not slow"` is the fast tier.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ruff check .
exec python -m pytest -q "$@"
