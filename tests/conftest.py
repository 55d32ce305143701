import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    # Triton's interpreter runs the GPU kernels on CPU (tests/ops/test_fused_routes.py). It must be
    # chosen before triton is first imported: megatron-core imports it, and triton.language's own
    # helpers are bound to the mode of that first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
