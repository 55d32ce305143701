"""Context-parallel MoBA on GPUs with NCCL (bf16 and fp32, both exchange modes): every rank's output
and q/k/v gradients against the single-device op. Needs 2 GPUs (4 for CP=4 and TP2 x CP2)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

LAYOUTS = [(2, 1), (4, 1), (2, 2)]


@pytest.mark.parametrize("cp,tp", LAYOUTS)
def test_cp_matches_single_device_on_gpus(tmp_path, cp, tp):
    from tests.parallel.cp_worker import GPU_CASES, spawn

    world = cp * tp
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    out = str(tmp_path / "cp")
    spawn(world, cp=cp, tp=tp, out=out, device="cuda", cases=GPU_CASES)
    for rank in range(world):
        for result in torch.load(f"{out}.{rank}"):
            bound = 2e-2 if result["case"]["dtype"] == "bfloat16" else 1e-4
            for name, err in result["errors"].items():
                assert err < bound, f"rank {rank} {result['case']}: {name} relative error {err:.2e}"
