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


def route(sel: torch.Tensor, nb: int, hkv: int, d: int, split_slots: bool = True) -> routing.Routes:
    """``route_selection`` of a whole selection ``[T, Hq, slots]``, handed out kv heads at a time."""
    t, hq, slots = sel.shape
    group = hq // hkv
    calls = []

    def select(kv0, kv1):
        calls.append((kv0, kv1))
        return sel[:, kv0 * group : kv1 * group].clone()

    routes = routing.route_selection(select, num_tokens=t, num_heads=hq, slots=slots, num_blocks=nb, num_kv_heads=hkv,
                                     head_dim=d, split_slots=split_slots)
    assert [kv for call in calls for kv in range(*call)] == list(range(hkv))  # each kv head once, in order
    return routes


@pytest.mark.parametrize("rows_a_query_head", [10**9, 0])
@pytest.mark.parametrize("budget,parts", [(10**9, 1), (40 * 5 * 8, 1), (40 * 5 * 8 - 1, 2), (40 * 2 * 8, 3), (1, 5)])
def test_every_selection_in_one_row_of_its_run(monkeypatch, budget, parts, rows_a_query_head):
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", budget)
    monkeypatch.setattr(routing, "ROUTING_ROWS_PER_QUERY_HEAD", rows_a_query_head)  # 0: a kv head a call
    t, hq, hkv, slots, nb, d = 40, 4, 2, 5, 9, 8
    g = torch.Generator().manual_seed(0)
    sel = torch.randint(0, nb, (t, hq, slots), generator=g, dtype=torch.int32)
    sel[torch.rand(t, hq, slots, generator=g) < 0.3] = -1  # unused slots
    expected = sorted((tt, h, s, int(sel[tt, h, s])) for tt in range(t) for h in range(hq) for s in range(slots)
                      if sel[tt, h, s] >= 0)
    routes = route(sel, nb, hkv, d)
    start = routes.run_start.tolist()
    assert start[0] == 0 and start == sorted(start) and start[-1] == len(expected)
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
    assert routing.slot_parts(10, 10, 10) == 1  # exactly the budget
    assert routing.slot_parts(10, 11, 10) == 2
    assert routing.slot_parts(10, 95, 10) == 10
    assert routing.slot_parts(1000, 3, 10) == 3  # not one slot fits: a part a slot


def test_slots_stay_whole_without_split_slots(monkeypatch):
    """For the Triton backward (``split_slots=False``) a head over the budget keeps its slots whole, a
    head a group; the fused forward then takes its tokens in windows."""
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 1)
    sel = torch.randint(0, 5, (12, 4, 3), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    routes = route(sel, 5, 2, 8, split_slots=False)
    assert routes.parts == 1 and routes.heads == 4 and routes.slots == 3
    assert [(g.h0, g.h1) for g in routes.groups] == [(h, h + 1) for h in range(4)]
    assert route(sel, 5, 2, 8).parts == 3


@pytest.mark.parametrize("kv_a_call", [1, 2, 3])
def test_routing_a_few_kv_heads_at_a_time_gives_the_same_runs(monkeypatch, kv_a_call):
    """Calls of several kv heads (GQA, uneven last call) give the runs one call gives, row for row."""
    t, hq, hkv, slots, nb, d = 33, 6, 3, 4, 7, 8
    g = torch.Generator().manual_seed(1)
    sel = torch.randint(0, nb, (t, hq, slots), generator=g, dtype=torch.int32)
    sel[torch.rand(t, hq, slots, generator=g) < 0.4] = -1
    whole = route(sel, nb, hkv, d)
    monkeypatch.setattr(routing, "ROUTING_ROWS_PER_QUERY_HEAD", kv_a_call * (hq // hkv) * slots / hq)
    parts = route(sel, nb, hkv, d)
    assert torch.equal(parts.run_start, whole.run_start)
    used = int(whole.run_start[-1])
    assert torch.equal(parts.order[:used], whole.order[:used])


def test_place_rows_in_triton_as_in_torch():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(2)
    rows = torch.randperm(3 * 4 * 5, generator=g)  # a call's rows: 3 tokens, 2 heads of 5 slots (x2: a tail)
    rows = rows[rows < 3 * 2 * 5]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's interpreter on CPU (tests/conftest.py)
    rows = rows.to(device)
    for fused in (False, True):
        order = torch.full((40,), -1, dtype=torch.int32, device=device)
        routing.place_rows(order, rows.clone(), torch.tensor(7, device=device), 2 * 5, 4 * 5, 3 * 5, fused=fused)
        expected = rows + rows // 10 * 20 + 15  # heads 3 and 4 of 6
        assert order[7:37].tolist() == expected.tolist()
        assert order[:7].tolist() == [-1] * 7 and order[37:].tolist() == [-1] * 3
