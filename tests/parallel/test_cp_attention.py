"""Context-parallel MoBA on CPU with gloo: at CP=2, CP=4 and TP2 x CP2, in both exchange modes,
every rank's output and q/k/v gradients equal the single-device op's on the whole sequences."""

import pytest
import torch

from .cp_worker import CPU_CASES, spawn

pytestmark = pytest.mark.slow  # each test launches processes


@pytest.mark.parametrize("cp,tp", [(2, 1), (4, 1), (2, 2)])
def test_cp_matches_single_device(tmp_path, cp, tp):
    world = cp * tp
    out = str(tmp_path / "cp")
    spawn(world, cp=cp, tp=tp, out=out, device="cpu", cases=CPU_CASES)
    for rank in range(world):
        for result in torch.load(f"{out}.{rank}"):
            for name, err in result["errors"].items():
                assert err < 1e-5, f"rank {rank} {result['case']}: {name} relative error {err:.2e}"


def test_bad_input_under_cp_names_the_problem(tmp_path):
    from .cp_worker import spawn_bad_inputs

    out = str(tmp_path / "bad")
    spawn_bad_inputs(2, out)
    found = torch.load(f"{out}.0")
    assert found["split"] is None
    assert "64 / 4 = 16 tokens per chunk is not a multiple of moba_chunk_size 12" in found["blocks"]
    assert "q holds 32 tokens, but batch 2 x seq_len 64 / context_parallel_size 2" in found["tokens"]
    assert "comm must be one of" in found["comm"]
    assert "context-parallel process group has 2 ranks but config.context_parallel_size is 4" in found["groups"]
    assert "packed THD sequences under context parallelism" in found["thd"]
