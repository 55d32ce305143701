"""Context-parallel building blocks (torch.distributed only, no model code).

MoBA under context parallelism keeps KV blocks where Megatron's load-balanced sharding put them and
exchanges only what gating and attention need (``../shared/DESIGN.md`` §6). This package holds the
pieces that do not depend on the attention itself: which tokens and blocks a rank holds, the
all-gather of block key sums that every rank gates against, and the byte count that picks the
exchange mode. The attention exchange built on them is not here yet.
"""

from .cost import choose_cp_comm, cp_comm_bytes
from .exchange import gather_block_sums
from .sharding import check_cp_split, local_block_ids, local_positions, zigzag_chunks

__all__ = [
    "check_cp_split",
    "choose_cp_comm",
    "cp_comm_bytes",
    "gather_block_sums",
    "local_block_ids",
    "local_positions",
    "zigzag_chunks",
]
