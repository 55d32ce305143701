"""Context-parallel sharding and the exchange-mode choice (no processes needed)."""

import pytest
import torch
import torch.distributed as dist

from moba_megatron.parallel import check_cp_split, choose_cp_comm, cp_comm_bytes, local_block_ids, local_positions


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_positions_match_megatron_sharding(cp):
    from megatron.core.utils import _get_batch_on_this_cp_rank_per_sequence_balancing

    seq = 64
    tokens = torch.arange(seq)[None]
    seen = []
    for rank in range(cp):
        class Group:  # stands in for a CP process group of size cp, seen from `rank`
            pass

        original = (dist.get_world_size, dist.get_rank)
        dist.get_world_size, dist.get_rank = (lambda group=None: cp), (lambda group=None, r=rank: r)
        try:
            local = _get_batch_on_this_cp_rank_per_sequence_balancing({"tokens": tokens.clone()}, cp_group=Group())[
                "tokens"
            ][0]
        finally:
            dist.get_world_size, dist.get_rank = original
        assert torch.equal(local, local_positions(seq, cp, rank))
        seen += local.tolist()
    assert sorted(seen) == list(range(seq))


def test_local_blocks_cover_every_block_once():
    seq, cp, chunk = 96, 3, 8
    blocks = [b for r in range(cp) for b in local_block_ids(seq, cp, r, chunk)]
    assert sorted(blocks) == list(range(seq // chunk))
    assert local_block_ids(seq, cp, 0, chunk) == [0, 1, 10, 11]


def test_blocks_must_not_straddle_ranks():
    assert check_cp_split(4096 * 8, 4, 4096) == 4096
    with pytest.raises(
        ValueError,
        match=r"seq_len 1001 must split into 2 x context_parallel_size = 8 equal chunks; use a multiple of 8",
    ):
        check_cp_split(1001, 4, 64)
    with pytest.raises(
        ValueError,
        match=r"= 3072 tokens per chunk is not a multiple of moba_chunk_size 4096; "
        r"use a seq_len that is a multiple of 32768",
    ):
        check_cp_split(24576, 4, 4096)


def test_auto_mode_follows_the_byte_count():
    # docs/context-parallel.md: routing wins for small topk without GQA, all-gather for topk 12 with GQA at cp 4
    assert choose_cp_comm(1 << 20, 4, 3, 8, 8, 128) == "routed"
    assert choose_cp_comm(1 << 20, 16, 3, 32, 32, 128) == "routed"
    assert choose_cp_comm(1 << 20, 4, 12, 32, 8, 128) == "allgather"
    assert choose_cp_comm(1 << 20, 4, 12, 8, 8, 128) == "allgather"
    # the count itself: all-gather sends (cp-1) copies of the local K and V
    assert cp_comm_bytes("allgather", 1024, 4, 12, 8, 2, 64) == 2 * 3 * 256 * 2 * 64 * 2
    with pytest.raises(ValueError, match="unknown context-parallel exchange mode 'ring'"):
        cp_comm_bytes("ring", 1024, 4, 12, 8, 2, 64)


@pytest.mark.parametrize("cp,batch", [(1, 1), (2, 3), (4, 2)])
def test_block_owner_inverts_the_local_block_ids(cp, batch):
    from moba_megatron.parallel import shard_blocks

    seq, chunk = 64, 4
    shards = [shard_blocks(batch, seq, cp, r, chunk, torch.device("cpu")) for r in range(cp)]
    seen = []
    for rank, shard in enumerate(shards):
        owner, index = shard.owner(torch.tensor(shard.block_ids))
        assert owner.tolist() == [rank] * shard.local_blocks
        assert index.tolist() == list(range(shard.local_blocks))
        assert shard.all_block_ids.tolist() == [b for s in shards for b in s.block_ids]
        # tokens: each local token's global block is its local block's global id
        assert shard.token_block.tolist() == [b for b in shard.block_ids for _ in range(chunk)]
        seen += shard.block_ids
    assert sorted(seen) == list(range(batch * seq // chunk))
