"""Routing of block selections into sorted runs (ops/moba/routing.py): every selection lands in
exactly one row of the run of its (kv head, block), also where a head's slots are split into parts."""

import pytest
import torch

from moba_megatron.ops.moba import routing


def decode(routes: routing.Routes, nb: int):
    """(token, query head, slot of the head, block) of every row in a run, from the sorted order."""
    start = routes.run_start.tolist()
    found = []
    for run in range(routes.num_runs):
        for rid in routes.order[start[run] : start[run + 1]].tolist():
            cell, vslot = divmod(rid, routes.slots)
            t, vh = divmod(cell, routes.heads)
            h, part = divmod(vh, routes.parts)
            found.append((t, h, part * routes.slots + vslot, routes.run_key_block(run) % nb, run))
    return found


@pytest.mark.parametrize("budget,parts", [(10**9, 1), (40 * 5 * 8, 1), (40 * 5 * 8 - 1, 2), (40 * 2 * 8, 3), (1, 5)])
def test_every_selection_in_one_row_of_its_run(monkeypatch, budget, parts):
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", budget)
    monkeypatch.setattr(routing, "SLOT_PARTS_ABOVE_CHUNK", 0)
    t, hq, hkv, slots, nb, d = 40, 4, 2, 5, 9, 8
    g = torch.Generator().manual_seed(0)
    sel = torch.randint(0, nb, (t, hq, slots), generator=g, dtype=torch.int32)
    sel[torch.rand(t, hq, slots, generator=g) < 0.3] = -1  # unused slots
    expected = sorted((tt, h, s, int(sel[tt, h, s])) for tt in range(t) for h in range(hq) for s in range(slots)
                      if sel[tt, h, s] >= 0)
    routes = routing.route_selection(sel.clone(), nb, hkv, d, 16)
    assert routes.parts == parts and routes.heads == hq * parts
    assert routes.order.dtype == torch.int32
    found = decode(routes, nb)
    assert sorted(f[:4] for f in found) == expected
    group = hq // hkv
    for tt, h, s, block, run in found:  # each row sits in the runs of its kv head
        assert run // (routes.subgroups * nb) == h // group
    if parts > 1:  # a virtual head a group, each group's runs one contiguous span
        assert [(g.h0, g.h1) for g in routes.groups] == [(v, v + 1) for v in range(hq * parts)]
    for grp in routes.groups:
        assert routes.real_heads(grp).stop - routes.real_heads(grp).start == max(1, (grp.h1 - grp.h0) // parts)
        rows = [f for f in found if f[4] in grp.runs()]
        heads = {f[1] * parts + f[2] // routes.slots for f in rows}
        assert heads <= set(range(grp.h0, grp.h1))


def test_slot_parts_fit_the_budget(monkeypatch):
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 1000)
    assert routing.slot_parts(10, 10, 10, 512) == 1  # exactly the budget
    assert routing.slot_parts(10, 11, 10, 512) == 2
    assert routing.slot_parts(10, 95, 10, 512) == 10
    assert routing.slot_parts(1000, 3, 10, 512) == 3  # not one slot fits: a part a slot
    assert routing.slot_parts(10, 95, 10, 256) == 1  # small blocks: one part (SLOT_PARTS_ABOVE_CHUNK)
