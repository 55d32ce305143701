"""Context-parallel building blocks (torch.distributed only, no model code).

MoBA under context parallelism keeps KV blocks where Megatron's load-balanced sharding put them and
exchanges only what gating and attention need (docs/context-parallel.md): sharding.py says which
tokens and blocks a rank holds, exchange.py holds the collectives, cost.py the byte count that picks
the exchange mode, attention.py the context-parallel op ``moba_attn_cp`` built on them, and halo.py
the keys before each chunk that the key convolution needs.
"""

from .attention import CP_COMM_MODES, moba_attn_cp
from .cost import choose_cp_comm, cp_comm_bytes
from .exchange import gather_block_sums
from .halo import chunk_halos
from .sharding import ShardBlocks, check_cp_split, local_block_ids, local_positions, shard_blocks, zigzag_chunks

__all__ = [
    "CP_COMM_MODES",
    "ShardBlocks",
    "moba_attn_cp",
    "shard_blocks",
    "check_cp_split",
    "chunk_halos",
    "choose_cp_comm",
    "cp_comm_bytes",
    "gather_block_sums",
    "local_block_ids",
    "local_positions",
    "zigzag_chunks",
]
