"""Turn block selections into kernel calls over the selected blocks.

Every selection (query, head, slot) becomes a row. Rows are sorted by (head, block), so the queries
that chose one block of one head are consecutive. They are cut into *tiles*, each attending one
full block of C keys, and tiles are packed into *pieces*, one kernel call each, sized to a memory
budget. For fixed-shape kernels every tile of a piece is padded to the piece's width; full-width
tiles and the remainders are packed apart, remainders by size, so little padding is computed.
Keys reach a call as the tiles' blocks of a block-major copy of K (one copy, never repeated per
GQA head).

Heads are processed in groups so the fp32 merge and gradient state stays bounded. ``plan_groups``
sorts the rows on the device; ``plan_pieces`` cuts the tiles, which needs the selection counts on
the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


PIECE_BUDGET_ELEMENTS = 1 << 27  # padded query rows + K/V tile elements per kernel call
STATE_BUDGET_ELEMENTS = 1 << 28  # per-slot partial results ([T, heads, slots, D]) per head group
_REMAINDER_FILL = 0.75  # a remainder tile starts a new piece below this fraction of its width...
_MIN_WIDTH = 512  # ...unless the piece is this narrow already (few launches beat less padding)


@dataclass(frozen=True)
class Piece:
    """One kernel call: tiles of a head group's sorted rows, each attending one block."""

    width: int | None  # padded rows per tile; None: unpadded (varlen kernels)
    max_rows: int
    num_rows: int  # real rows over all tiles
    tile_row0: torch.Tensor  # [tiles] int64, first sorted row of each tile
    tile_rows: torch.Tensor  # [tiles] int64, rows in each tile
    tile_block: torch.Tensor  # [tiles] int64, kv_head * num_blocks + block: the tile's keys

    @property
    def num_tiles(self) -> int:
        return self.tile_rows.numel()

    def slots(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sorted-row index of every kernel row, and which of them are real (None: all)."""
        if self.width is None:
            starts = self.tile_rows.cumsum(0) - self.tile_rows
            tile = torch.repeat_interleave(
                torch.arange(self.num_tiles, device=starts.device), self.tile_rows, output_size=self.num_rows
            )
            return self.tile_row0[tile] + torch.arange(tile.numel(), device=tile.device) - starts[tile], None
        pos = torch.arange(self.width, device=self.tile_rows.device)
        valid = pos[None, :] < self.tile_rows[:, None]
        # Padding repeats the tile's last row: finite inputs, and their results are dropped.
        rows = self.tile_row0[:, None] + torch.minimum(pos[None, :], self.tile_rows[:, None] - 1)
        return rows.flatten(), valid.flatten()

    def destinations(self, order: torch.Tensor, spare: int):
        """``slots()`` and where each kernel row's result goes: ``order`` of its sorted row, padding
        to the ``spare`` row."""
        slots, valid = self.slots()
        dst = order[slots]
        if valid is not None:
            dst = torch.where(valid, dst, spare)
        return slots, valid, dst


@dataclass(frozen=True)
class HeadGroup:
    h0: int  # query heads [h0, h1)
    h1: int
    order: torch.Tensor  # [T * (h1 - h0) * slots] int64, flat index into [T, h1 - h0, slots], sorted by
    # (head, block) with the selected rows first (unused slots sort last)
    run_counts: torch.Tensor  # [(h1 - h0) * blocks] on the device: rows per (head, block), in order


class SelectionCounts:
    """Host table ``counts[h][j]``: how many queries of head h chose block j.

    This is the op's one device-to-host copy after gating (kernel launches need tile counts and
    widths on the host). It is started here and awaited in ``wait``, so the own-block attention
    launched in between hides the wait."""

    def __init__(self, sel: torch.Tensor, num_blocks: int):
        _, hq, _ = sel.shape
        valid = sel >= 0
        heads = torch.arange(hq, device=sel.device).view(1, hq, 1)
        keys = (heads * num_blocks + sel.long())[valid]
        counts = torch.bincount(keys, minlength=hq * num_blocks).view(hq, num_blocks)
        self.on_device = counts  # [Hq, blocks]
        self.event = None
        if counts.is_cuda:
            self.host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self.host.copy_(counts, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = counts

    def wait(self) -> list[list[int]]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def head_groups(num_heads: int, group: int, cell_elements: int) -> list[tuple[int, int]]:
    """Ranges of query heads whose state (``cell_elements`` per head) fits the budget; a range
    never splits a GQA group unevenly, so kv-head gradient accumulators flush at group ends."""
    per = max(1, STATE_BUDGET_ELEMENTS // max(1, cell_elements))
    if per >= group:
        per = min(num_heads, per // group * group)
    else:
        per = max(d for d in range(1, group + 1) if group % d == 0 and d <= per)
    return [(h, min(h + per, num_heads)) for h in range(0, num_heads, per)]


def plan_groups(sel: torch.Tensor, counts: SelectionCounts, num_kv_heads: int, head_dim: int) -> list[HeadGroup]:
    """Sort each head group's rows by (head, block). Nothing is read on the host: the fused Triton
    forward launches from this alone (its tile tables are built on the device)."""
    t, hq, slots = sel.shape
    nb = counts.on_device.shape[1]
    device = sel.device
    groups = []
    for h0, h1 in head_groups(hq, hq // num_kv_heads, t * slots * head_dim):
        nh = h1 - h0
        local = torch.arange(nh, device=device).view(1, nh, 1)
        keys = torch.where(sel[:, h0:h1] >= 0, local * nb + sel[:, h0:h1].long(), nh * nb).flatten()
        groups.append(HeadGroup(h0, h1, torch.sort(keys, stable=True).indices, counts.on_device[h0:h1].flatten()))
    return groups


def plan_pieces(
    groups: list[HeadGroup], counts: SelectionCounts, group: int, chunk: int, head_dim: int, tile_width: int | None
) -> list[list[Piece]]:
    """The kernel calls of each head group's rows (``group`` query heads per kv head); reads the
    selection counts on the host (launch shapes depend on them). ``tile_width=None`` makes one
    unpadded tile per (head, block), for varlen kernels; an int cuts tiles of at most that many
    rows, for padded fixed-shape kernels."""
    host = counts.wait()
    nb = len(host[0]) if host else 0
    device = counts.on_device.device
    return [
        pack_tiles(
            ((host[h][j], (h // group) * nb + j) for h in range(grp.h0, grp.h1) for j in range(nb)),
            tile_width, chunk, head_dim, device,
        )
        for grp in groups
    ]


def pack_tiles(runs, tile_width: int | None, chunk: int, head_dim: int, device) -> list[Piece]:
    """Cut sorted rows into tiles and pack the tiles into pieces.

    ``runs`` yields ``(rows, kv block)`` for consecutive runs of sorted rows that attend one block.
    ``tile_width=None`` makes one unpadded tile per run, for varlen kernels; an int cuts tiles of
    at most that many rows, for padded fixed-shape kernels."""
    full, rest = [], []  # tiles as (first row, rows, kv block)
    row = 0
    for n, block in runs:
        step = tile_width or max(n, 1)
        for r0 in range(0, n, step):
            tile = (row + r0, min(step, n - r0), block)
            (full if tile[1] == tile_width else rest).append(tile)
        row += n
    rest.sort(key=lambda tile: -tile[1])
    tiles = full + rest
    if not tiles:
        return []
    bounds = _pack(full, tile_width, chunk, head_dim)
    bounds += [(len(full) + a, len(full) + b, w) for a, b, w in _pack(rest, tile_width, chunk, head_dim)]
    # One host-to-device copy for every tile table.
    table = torch.tensor(tiles, dtype=torch.int64).t().contiguous().to(device, non_blocking=True)
    return [
        Piece(
            width=w,
            max_rows=max(n for _, n, _ in tiles[a:b]),
            num_rows=sum(n for _, n, _ in tiles[a:b]),
            tile_row0=table[0, a:b],
            tile_rows=table[1, a:b],
            tile_block=table[2, a:b],
        )
        for a, b, w in bounds
    ]


def _pack(tiles, tile_width, chunk, head_dim) -> list[tuple[int, int, int | None]]:
    """Greedy packing of tiles (remainders arrive largest first) into budgeted pieces:
    ``(first tile, end tile, padded width)`` each."""
    pieces, start = [], 0
    while start < len(tiles):
        width = None if tile_width is None else -(-tiles[start][1] // 64) * 64
        cost, end = 0, start
        while end < len(tiles):
            n = tiles[end][1]
            tile_cost = ((width or n) + 2 * chunk) * head_dim
            narrower = width and width > _MIN_WIDTH and n < _REMAINDER_FILL * width
            if end > start and (cost + tile_cost > PIECE_BUDGET_ELEMENTS or narrower):
                break
            cost += tile_cost
            end += 1
        pieces.append((start, end, width))
        start = end
    return pieces
