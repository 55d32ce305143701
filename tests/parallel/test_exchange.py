"""The block-sum all-gather over gloo: every rank ends with the single-device block sums."""

import os

import pytest
import torch
import torch.distributed as dist

from moba_megatron.ops.moba.gating import block_key_sums
from moba_megatron.ops.moba.layout import block_layout
from moba_megatron.parallel import gather_block_sums, local_positions, shard_blocks
from tests.megatron.harness import spawn_ranks

pytestmark = pytest.mark.slow  # each test launches processes

SEQ, CHUNK, HKV, D = 96, 4, 2, 8


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    k = torch.randn(SEQ, HKV, D, generator=torch.Generator().manual_seed(0))
    local_k = k[local_positions(SEQ, world, rank)]
    shard = shard_blocks(1, SEQ, world, rank, CHUNK, torch.device("cpu"))
    local_sums = block_key_sums(local_k, shard.local)
    gathered = gather_block_sums(local_sums, shard)
    expected = block_key_sums(k, block_layout((0, SEQ), CHUNK, torch.device("cpu")))
    torch.save(bool(torch.allclose(gathered, expected, atol=1e-5)), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gathered_block_sums_equal_single_device(tmp_path, world):
    # local chunks hold whole blocks, so the local layout's blocks are exactly the rank's blocks
    spawn_ranks(_rank, world, out=str(tmp_path / "ok"))
    assert all(torch.load(tmp_path / f"ok.{r}") for r in range(world))
