"""Turn block selections into runs of rows, and runs into kernel calls.

Every selection (cell, slot) is a *row*, numbered ``r = cell * slots + slot``; a cell is
``t * heads + h`` of a ``[T, heads]`` grid of queries (one device: every query head; context
parallelism's routed exchange: the received rows as ``T`` cells of one head and one slot). Rows are
sorted into *runs*, one per (kv head, head subgroup, key block), so the rows that attend one block
of one kv head are consecutive, and the runs of one block of one kv head are adjacent (``run_start``
bounds them all at once). Sorts on the device do it, a few kv heads at a time (the gate's selection
of those heads, their sort keys and the sort's temporaries then stay within
``ROUTING_ROWS_PER_QUERY_HEAD`` rows a query and head, whatever the top-k), each call's runs placed
right after the last call's; ``run_start`` (on the device) bounds the runs. The Triton kernels
(fused_routes.py) launch from that alone.

Heads are processed in groups so the per-slot merge state stays bounded (``head_groups``). When one
kv head's query heads must be split, each part gets runs of its own (a *subgroup*); a head group's
runs are then every ``subgroups``-th run. When even one head's state is over the budget (many slots
at long lengths), it is bounded in one of two ways, by what the backward keeps:

- the Triton backward keeps no per-slot state, so the slots stay whole and the fused forward takes
  the tokens in windows (``token_windows``), each attended and merged on its own;
- the tile backward and the PyTorch path keep a per-slot dq grid too, so there (``split_slots``) the
  slots are split into ``parts``, each routed as a head of its own (a *virtual head* ``h * parts + p``
  holding slots ``[p * width, (p + 1) * width)`` of head h), one virtual head a group: the merge is a
  log-sum-exp, so a head's parts merge one after the other.

For the backends whose kernels take tiles (``pieces``): runs are cut into *tiles*, each attending one
full block of C keys, and tiles are packed into *pieces*, one kernel call each, sized to a memory
budget. That needs the run sizes on the host, copied without blocking when the runs are built.
Fixed-shape kernels (``tile_width``) get every tile padded to one of a few widths and calls of a
power-of-two number of tiles, so a handful of shapes covers every step of a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PIECE_BUDGET_ELEMENTS = 1 << 27  # padded query rows + K/V tile elements per kernel call
KEYS_PER_CTA = 128  # keys of a tile per CTA of cuDNN's backward, as its times fit (see plan_calls)
CALL_OVERHEAD = 1 << 24  # a tile call's fixed costs (launch, setup), in row x key products
MODEL_SMS = 132  # multiprocessors plan_calls assumes off CUDA (an H200's): CPU tests see the GPU's plans
STATE_BUDGET_ELEMENTS = 1 << 28  # per-slot partial results ([T, heads, slots, D]) per head group
WINDOW_MIN_TOKENS = 64
# Selections routed at once, per query and head: the selection, its sort keys and the sort's temporaries
# take about 40 bytes a row, so 16 rows are a few times what the query, key and value themselves take and
# the peak stays within a dense attention's few multiples of them. Every top-k up to 17 routes in one call;
# larger ones in several, at no measured cost (16 to 48 rows: within 2% at 32K / 128 / 48 and 64 / 96).
ROUTING_ROWS_PER_QUERY_HEAD = 16


@dataclass(frozen=True)
class HeadGroup:
    h0: int  # heads [h0, h1) of the row view
    h1: int
    run0: int  # its runs: run0 + i * run_step for i < num_runs
    num_runs: int
    run_step: int

    def runs(self) -> range:
        return range(self.run0, self.run0 + self.num_runs * self.run_step, self.run_step)


@dataclass(frozen=True)
class Piece:
    """One kernel call: tiles of sorted rows, each attending one block."""

    width: int | None  # padded rows per tile; None: unpadded (varlen kernels)
    max_rows: int
    num_rows: int  # real rows over all tiles
    tile_row0: torch.Tensor  # [tiles] int64, first sorted row of each tile
    tile_rows: torch.Tensor  # [tiles] int64, rows in each tile (0: an empty tile)
    tile_block: torch.Tensor  # [tiles] int64, kv_head * num_blocks + block: the tile's keys
    key_blocks: tuple[int, ...]  # tile_block on the host

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
        # Padding repeats a real row of the tile: finite inputs; their dO is zeroed, results dropped.
        last = (self.tile_rows[:, None] - 1).clamp_(min=0)
        rows = self.tile_row0[:, None] + torch.minimum(pos[None, :], last)
        return rows.flatten(), valid.flatten()


def run_id_dtype(num_runs: int) -> torch.dtype:
    """The narrowest dtype of run ids up to ``num_runs`` (the unused slots' id): the radix sort makes
    a pass per key byte, so int16 takes two passes, not the eight of int64."""
    return torch.int16 if num_runs < 2**15 else torch.int32


class Routes:
    """Rows sorted into runs. ``heads`` counts the row view's heads, virtual where a head's slots are
    split into ``parts`` (the real head of virtual head h is ``h // parts``).
    ``order [rows]``: the row id at each sorted place, the runs' rows first (what follows them is
    unspecified: unused slots, or nothing), int32 where every row id fits (the kernels divide them:
    int64 division is slow, and the order is the largest thing the op keeps); ``run_start [runs + 1]``
    int64 on the device: where each run begins. Run ``(kv_head * num_blocks + block) * subgroups + sub``."""

    def __init__(self, order: torch.Tensor, run_start: torch.Tensor, *, num_tokens: int, heads: int, slots: int,
                 kv_heads: int, subgroups: int, num_blocks: int, groups: list[HeadGroup], parts: int = 1):
        self.num_tokens, self.heads, self.slots, self.parts = num_tokens, heads, slots, parts
        self.kv_heads, self.subgroups, self.num_blocks, self.groups = kv_heads, subgroups, num_blocks, groups
        self.num_runs = kv_heads * subgroups * num_blocks
        self.order, self.run_start = order, run_start
        self._host = None
        self._pieces: dict = {}

    def start_host_copy(self) -> None:
        """Copy the run bounds to the host without waiting (the tiles path reads them later)."""
        if self._host is None:
            if self.run_start.is_cuda:
                host = torch.empty(self.run_start.shape, dtype=self.run_start.dtype, pin_memory=True)
                host.copy_(self.run_start, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._host = (host, event)
            else:
                self._host = (self.run_start, None)

    def host_run_start(self) -> list[int]:
        self.start_host_copy()
        host, event = self._host
        if event is not None:
            event.synchronize()
        return host.tolist()

    def num_rows(self) -> int:
        """Rows in runs (reads the run bounds on the host)."""
        return self.host_run_start()[-1]

    def real_heads(self, grp: HeadGroup) -> slice:
        """The query heads head group ``grp`` holds (part of one, where slots are split)."""
        return slice(grp.h0 // self.parts, (grp.h1 - 1) // self.parts + 1)

    def run_key_block(self, run: int) -> int:
        """``kv_head * num_blocks + block`` of a run: the tile of keys it attends."""
        return run // self.subgroups

    def kv_heads_of(self, grp: HeadGroup) -> tuple[int, int, bool, bool]:
        """The kv heads ``[kv0, kv1)`` head group ``grp`` attends, whether it is their first group and
        whether it is their last (their gradients are then complete)."""
        per_kv = self.num_blocks * self.subgroups
        last = grp.run0 + (grp.num_runs - 1) * grp.run_step
        sub = grp.run0 % self.subgroups
        return grp.run0 // per_kv, last // per_kv + 1, sub == 0, sub == self.subgroups - 1

    def pieces(self, tile_width: int | None, chunk: int, head_dim: int) -> list[list[Piece]]:
        """The kernel calls of each head group's runs (reads the run bounds on the host)."""
        key = (tile_width, chunk, head_dim)
        if key not in self._pieces:
            start = self.host_run_start()
            device = self.run_start.device
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else MODEL_SMS
            self._pieces[key] = [
                pack_tiles(
                    ((start[r], start[r + 1] - start[r], self.run_key_block(r)) for r in g.runs()),
                    tile_width, chunk, head_dim, device, sms,
                )
                for g in self.groups
            ]
        return self._pieces[key]


def head_groups(num_heads: int, group: int, cell_elements: int) -> list[tuple[int, int]]:
    """Ranges of query heads whose state (``cell_elements`` per head) fits the budget; a range
    never splits a GQA group unevenly."""
    per = max(1, STATE_BUDGET_ELEMENTS // max(1, cell_elements))
    if per >= group:
        per = min(num_heads, per // group * group)
    else:
        per = max(d for d in range(1, group + 1) if group % d == 0 and d <= per)
    return [(h, min(h + per, num_heads)) for h in range(0, num_heads, per)]


def token_windows(num_tokens: int, cells_per_token: int, head_dim: int) -> list[tuple[int, int]]:
    """Token ranges ``(t0, t1)`` whose merge grid (``cells_per_token`` rows of ``head_dim`` a token: a
    head group's heads x slots) fits the state budget; the fused forward attends and merges a head
    group one window at a time. Its backward needs no grid, so the slots stay whole. A window holds at
    least ``WINDOW_MIN_TOKENS``: each costs three kernel launches."""
    per = max(WINDOW_MIN_TOKENS, STATE_BUDGET_ELEMENTS // max(1, cells_per_token * head_dim))
    return [(t0, min(num_tokens, t0 + per)) for t0 in range(0, num_tokens, per)] or [(0, 0)]


def slot_parts(num_tokens: int, slots: int, head_dim: int) -> int:
    """Into how many parts one head's slots are split so each part's state fits the budget."""
    if num_tokens * slots * head_dim <= STATE_BUDGET_ELEMENTS:
        return 1
    width = max(1, STATE_BUDGET_ELEMENTS // (num_tokens * head_dim))
    return -(-slots // width)


def sort_rows(keys: torch.Tensor, run0: int, run1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys [n]`` (run ids in ``[run0, run1)``, or anything at least ``run1`` for rows in no run) -> the
    rows' indices sorted by run (int64; stable, so in index order within a run) and where runs
    ``run0 .. run1`` begin among them (``[run1 - run0 + 1]`` int64)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(run0, run1 + 1, device=keys.device, dtype=sorted_keys.dtype)
    return order, torch.searchsorted(sorted_keys, bounds)


def place_rows(order: torch.Tensor, rows: torch.Tensor, base: torch.Tensor, per_token: int, token_stride: int,
               offset: int, *, fused: bool = False) -> None:
    """``order[base + i] = r + r // per_token * token_stride + offset`` for each ``r = rows[i]`` (consumed):
    a routing call's sorted rows, renumbered from its heads to every head, placed right after the
    previous call's runs (its unused rows, last, are overwritten by the next call's or left past the
    runs). ``base`` is on the device, so the host need not wait for it. ``fused``: in one Triton pass."""
    if fused:
        from .fused_routes import place_rows as place_rows_fused

        place_rows_fused(order, rows, base, per_token, token_stride, offset)
        return
    tok = torch.div(rows, per_token, rounding_mode="floor")
    rows.add_(tok, alpha=token_stride).add_(offset)
    del tok
    order.index_copy_(0, torch.arange(rows.numel(), device=rows.device).add_(base), rows.to(order.dtype))


@dataclass(frozen=True)
class RowView:
    """How a selection's rows are numbered and grouped: ``heads`` (virtual where a head's slots are split
    into ``parts`` of ``slots`` each), ``subgroups`` of each kv head's query heads, each (virtual) head's
    run of block 0 (``first_run``), and the head groups."""

    parts: int
    heads: int
    slots: int  # a (virtual) head's slots
    subgroups: int
    first_run: torch.Tensor  # [heads] int64, on the host
    groups: list[HeadGroup]


def row_view(num_tokens: int, num_heads: int, slots: int, num_blocks: int, num_kv_heads: int, head_dim: int,
             split_slots: bool) -> RowView:
    """The rows' numbering and head groups, sized to the state budget (``split_slots``: a head over it
    has its slots split into parts)."""
    parts = slot_parts(num_tokens, slots, head_dim) if split_slots else 1
    if parts > 1:  # virtual heads of ``width`` slots each, the last padded with unused slots
        hq, slots = num_heads * parts, -(-slots // parts)
        ranges = [(h, h + 1) for h in range(hq)]
    else:
        hq = num_heads
        ranges = head_groups(hq, hq // num_kv_heads, num_tokens * slots * head_dim)
    group = hq // num_kv_heads
    per = ranges[0][1] - ranges[0][0]
    subgroups = group // per if per < group else 1
    heads = torch.arange(hq)
    first_run = (heads // group) * num_blocks * subgroups + (heads % group) // per % subgroups
    if subgroups == 1:  # groups of whole kv heads: their runs are consecutive
        groups = [HeadGroup(h0, h1, int(first_run[h0]), (h1 - h0) // group * num_blocks, 1) for h0, h1 in ranges]
    else:  # a group a subgroup of one kv head: every subgroups-th run
        groups = [HeadGroup(h0, h1, int(first_run[h0]), num_blocks, subgroups) for h0, h1 in ranges]
    return RowView(parts, hq, slots, subgroups, first_run, groups)


def route_selection(select, *, num_tokens: int, num_heads: int, slots: int, num_blocks: int, num_kv_heads: int,
                    head_dim: int, split_slots: bool, fused: bool = False) -> Routes:
    """Block selections -> the rows sorted into runs, in head groups sized to the state budget. Nothing
    is read on the host.

    ``select(kv0, kv1)`` gives the selections of the query heads of kv heads ``[kv0, kv1)``: ``[T, heads,
    slots]`` block ids (-1: unused slot). It is called for a few kv heads at a time, each call's rows
    sorted on their own (``ROUTING_ROWS_PER_QUERY_HEAD``): the selection, its sort keys and the sort's
    temporaries then stay bounded whatever the top-k; only the order is as long as every row.
    ``split_slots``: a head whose state is over the budget has its slots split into parts (where the
    backward keeps per-slot state: not the Triton backward, see the module's docstring). ``fused``:
    renumber the calls' rows in Triton (``place_rows``)."""
    t = num_tokens
    view = row_view(t, num_heads, slots, num_blocks, num_kv_heads, head_dim, split_slots)
    hq, vslots, subgroups = view.heads, view.slots, view.subgroups
    group = hq // num_kv_heads
    runs_per_kv = subgroups * num_blocks
    nruns = num_kv_heads * runs_per_kv
    order_dtype = torch.int32 if t * hq * vslots < 2**31 else torch.int64
    narrow = run_id_dtype(nruns)
    budget = round(ROUTING_ROWS_PER_QUERY_HEAD * t * num_heads)
    calls = -(-num_kv_heads // max(1, budget // max(1, t * group * vslots)))
    kv_per_call = -(-num_kv_heads // calls)  # as even as whole kv heads allow
    order = run_start = base = None
    for kv0 in range(0, num_kv_heads, kv_per_call):
        kv1 = min(num_kv_heads, kv0 + kv_per_call)
        h0, h1 = kv0 * group, kv1 * group  # the call's (virtual) heads
        sel = select(kv0, kv1)
        if view.parts > 1:
            sel = torch.nn.functional.pad(sel, (0, view.parts * vslots - slots), value=-1).view(t, h1 - h0, vslots)
        # The keys are built in the sort's narrow dtype, and ``sel`` let go before the sort.
        keys = sel.to(narrow)
        keys *= subgroups
        keys += view.first_run[h0:h1].to(sel.device, narrow, non_blocking=True).view(1, h1 - h0, 1)
        keys.masked_fill_(sel < 0, nruns)
        del sel
        rows, bounds = sort_rows(keys.view(-1), kv0 * runs_per_kv, kv1 * runs_per_kv)
        del keys
        if kv0 == 0 and kv1 == num_kv_heads:  # one call: its rows are every row, in place
            order, run_start = rows.to(order_dtype), bounds
            break
        if order is None:
            order = torch.empty(t * hq * vslots, dtype=order_dtype, device=rows.device)
            run_start = torch.empty(nruns + 1, dtype=torch.int64, device=rows.device)
            base = torch.zeros((), dtype=torch.int64, device=rows.device)
        # The call's rows are numbered in its [T, h1 - h0, vslots]; in the whole [T, hq, vslots] a token's
        # rows lie (hq - h1 + h0) * vslots further on each token, and h0 * vslots further on.
        place_rows(order, rows, base, (h1 - h0) * vslots, (hq - h1 + h0) * vslots, h0 * vslots, fused=fused)
        del rows
        run_start[kv0 * runs_per_kv : kv1 * runs_per_kv + 1] = bounds + base
        base = run_start[kv1 * runs_per_kv].clone()
    return Routes(order, run_start, num_tokens=t, heads=hq, slots=vslots, kv_heads=num_kv_heads,
                  subgroups=subgroups, num_blocks=num_blocks, groups=view.groups, parts=view.parts)


def route_rows(keys: torch.Tensor, num_kv_heads: int, num_blocks: int) -> Routes:
    """Loose rows, ``keys [n]`` = ``kv_head * num_blocks + block`` each: ``n`` cells of one head and
    one slot, in one head group."""
    nruns = num_kv_heads * num_blocks
    rows, run_start = sort_rows(keys.to(run_id_dtype(nruns)), 0, nruns)
    order = rows.to(torch.int32) if rows.numel() < 2**31 else rows
    return Routes(order, run_start, num_tokens=keys.numel(), heads=1, slots=1, kv_heads=num_kv_heads, subgroups=1,
                  num_blocks=num_blocks, groups=[HeadGroup(0, 1, 0, nruns, 1)])


def padded_width(rows: int, tile_width: int) -> int:
    """The width a tile of ``rows`` rows is padded to: a power of two from 64 up to 2048, then
    multiples of 2048, at most ``tile_width`` (at most ~4 + tile_width / 2048 widths in all)."""
    width = 1 << max(6, (rows - 1).bit_length())
    if width > 2048:
        width = -(-rows // 2048) * 2048
    return min(width, tile_width)


def call_budget(width: int, chunk: int, head_dim: int) -> int:
    """The most tiles of ``width`` rows one call may hold: a power of two within the memory budget."""
    most = max(1, PIECE_BUDGET_ELEMENTS // ((width + 2 * chunk) * head_dim))
    return 1 << (most.bit_length() - 1)


def plan_calls(rows: list[int], tile_width: int, chunk: int, head_dim: int, sms: int) -> list[int]:
    """How many tiles each call takes, in order, from tiles of ``rows`` rows sorted widest first.

    A call of n tiles (a power of two, at most the budget) is padded to the width of its first
    tile. cuDNN's backward times fit one CTA per 128 keys of each tile (profiles, benchmarks/RESULTS.md):
    a call takes about as long as one of ``sms * 128 / chunk`` tiles until it has that many. Every
    call also costs ``CALL_OVERHEAD``. The cheapest plan under that model, by dynamic programming
    over the sorted tiles (taking more of them into a call never makes the rest dearer)."""
    m = len(rows)
    if m == 0:
        return []
    fill = sms * KEYS_PER_CTA / chunk
    # Full calls of the widest tiles while two more remain (most tiles at long lengths): no plan
    # pays less for them, and the search below stays short.
    widest = padded_width(rows[0], tile_width)
    call = call_budget(widest, chunk, head_dim)
    lead = 0
    while call >= fill and lead + 2 * call <= m and padded_width(rows[lead + 2 * call - 1], tile_width) == widest:
        lead += call
    best, take = [0.0] * (m + 1), [1] * m
    for i in range(m - 1, lead - 1, -1):
        width = padded_width(rows[i], tile_width)
        best[i] = math.inf
        for n in (1 << b for b in range(call_budget(width, chunk, head_dim).bit_length())):
            cost = max(n, fill) * width * chunk + CALL_OVERHEAD + best[min(m, i + n)]
            if cost < best[i]:
                best[i], take[i] = cost, n
    plan, i = [call] * (lead // call), lead
    while i < m:
        plan.append(take[i])
        i += take[i]
    return plan


def pack_tiles(runs, tile_width: int | None, chunk: int, head_dim: int, device, sms: int = MODEL_SMS) -> list[Piece]:
    """Cut runs of sorted rows into tiles and pack the tiles into pieces.

    ``runs`` yields ``(first sorted row, rows, kv block)``. ``tile_width=None`` makes one unpadded
    tile per run and packs tiles greedily to the budget, for varlen kernels. An int cuts tiles of at
    most that many rows, sorts them widest first and packs them into calls of a power-of-two number
    of tiles, each padded to ``padded_width`` of its widest, as ``plan_calls`` finds cheapest on a GPU
    of ``sms`` multiprocessors; only the last call may hold empty tiles. Fixed-shape kernels thus see
    a bounded set of shapes. (Padding every call to 32 tiles cost 27% extra rows at 128K / 4096 /
    12; calls of one width class each, 3%, but left the GPU a quarter idle in calls of one tile.)"""
    tiles = []  # (first row, rows, kv block)
    for row0, n, block in runs:
        step = tile_width or max(n, 1)
        tiles += [(row0 + r0, min(step, n - r0), block) for r0 in range(0, n, step)]
    spans = []  # (width, tiles, empty tiles)
    if tile_width is None:
        start, cost = 0, 0
        for i, (_, n, _) in enumerate(tiles):
            tile_cost = (n + 2 * chunk) * head_dim
            if i > start and cost + tile_cost > PIECE_BUDGET_ELEMENTS:
                spans.append((None, tiles[start:i], 0))
                start, cost = i, 0
            cost += tile_cost
        if tiles:
            spans.append((None, tiles[start:], 0))
    else:
        tiles.sort(key=lambda tile: -tile[1])
        start = 0
        for n in plan_calls([tile[1] for tile in tiles], tile_width, chunk, head_dim, sms):
            part = tiles[start : start + n]
            spans.append((padded_width(part[0][1], tile_width), part, n - len(part)))
            start += n
    table, offsets = [], []
    for _, part, empty in spans:
        offsets.append((len(table), len(table) + len(part) + empty))
        row0, _, block = part[-1]  # empty tiles: no rows, the last real tile's row and keys
        table += part + [(row0, 0, block)] * empty
    if not table:
        return []
    # One host-to-device copy for every tile table.
    dev = torch.tensor(table, dtype=torch.int64).t().contiguous().to(device, non_blocking=True)
    return [
        Piece(
            width=width,
            max_rows=max(n for _, n, _ in part),
            num_rows=sum(n for _, n, _ in part),
            tile_row0=dev[0, o0:o1],
            tile_rows=dev[1, o0:o1],
            tile_block=dev[2, o0:o1],
            key_blocks=tuple(block for _, _, block in table[o0:o1]),
        )
        for (width, part, _), (o0, o1) in zip(spans, offsets)
    ]
