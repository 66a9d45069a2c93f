"""The reducer interface on real Gloo groups: every reducer against its own single-process
reference, what statistics cost, lifecycle (buffers, close, pickling) and the timeout of the
groups the library creates."""

from __future__ import annotations

import pickle
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import adasum
from adasum._groups import timeout_of
from adasum.ddp import AdasumState, adasum_hook
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer
from conftest import TIMEOUT, caught, messages, rel_err, same_bits

SHAPES = [((6, 4), torch.float32), ((9,), torch.float64), ((5,), torch.bfloat16)]


def rank_inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(70 + rank)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(d) for s, d in SHAPES]


def reducers() -> dict[str, adasum.Reducer]:
    return {"adasum": adasum.Adasum(), "average": adasum.Average(), "sum": adasum.Sum(),
            "hierarchical": adasum.Hierarchical(1)}


def _every_reducer(rank: int, world: int) -> dict:
    out = {}
    for name, reducer in reducers().items():
        with reducer:
            tensors = rank_inputs(rank)
            reducer.all_reduce(tensors)
            out[name] = tensors
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_reducer_equals_its_single_process_reference(world):
    results = spawn(_every_reducer, world, timeout=TIMEOUT)
    inputs = [rank_inputs(r) for r in range(world)]
    for name, reducer in reducers().items():
        expected = reducer.reduce(inputs)
        for r in results[1:]:
            assert same_bits(results[0][name], r[name]), name
        for got, want, (_, dtype) in zip(results[0][name], expected, SHAPES):
            assert got.dtype == dtype
            assert rel_err(got, want) <= (1e-2 if dtype == torch.bfloat16 else 1e-6), name


VIEW_SHAPES = [(6, 4), (9,), (5,)]


def _view_inputs(rank: int) -> list[torch.Tensor]:
    return [torch.randn(s, generator=torch.Generator().manual_seed(10 * rank + i)) for i, s in enumerate(VIEW_SHAPES)]


def _laid_out(tensors: list[torch.Tensor], order: list[int]) -> list[torch.Tensor]:
    """Views of one buffer holding ``tensors`` in ``order``, returned in their own order."""
    buffer = torch.cat([tensors[i].reshape(-1) for i in order])
    views, at = {}, 0
    for i in order:
        views[i] = buffer[at : at + tensors[i].numel()].view(tensors[i].shape)
        at += tensors[i].numel()
    return [views[i] for i in range(len(tensors))]


def _views(rank: int, world: int) -> dict:
    """The same tensors as separate tensors, as views end to end of one buffer, as views of one
    buffer in another order, and as views with a gap between them."""
    out = {}
    for name, tensors in (("separate", _view_inputs(rank)),
                          ("end_to_end", _laid_out(_view_inputs(rank), [0, 1, 2])),
                          ("reordered", _laid_out(_view_inputs(rank), [2, 0, 1]))):
        reducer = adasum.Adasum(algorithm="vhdd")
        reducer.all_reduce(tensors)
        out[name] = [t.clone() for t in tensors]
        out[f"{name} packed"] = any(k.startswith("pack") for k in reducer._buffers.numels())
    buffer = torch.full((40,), 7.0)
    gapped = [buffer[:24].view(6, 4), buffer[25:34]]
    for view, t in zip(gapped, _view_inputs(rank)):
        view.copy_(t)
    adasum.Adasum(algorithm="vhdd").all_reduce(gapped)
    out["gapped"], out["gap"] = [t.clone() for t in gapped], float(buffer[24])
    return out


def test_views_of_one_buffer_are_reduced_where_they_lie_and_others_are_packed():
    for r in spawn(_views, 2, timeout=TIMEOUT):
        assert same_bits(r["end_to_end"], r["separate"]) and not r["end_to_end packed"]
        assert same_bits(r["reordered"], r["separate"]) and r["reordered packed"]
        assert same_bits(r["gapped"], r["separate"][:2]) and r["gap"] == 7.0


class _OneMoreMessage(adasum.Adasum):
    """Adasum that sends one more message when asked for statistics: what the test below
    must catch."""

    def _reduce(self, flats, stats):
        if stats:
            dist.all_reduce(torch.zeros(1), group=self.group)
        return super()._reduce(flats, stats)


def _messages(rank: int, world: int) -> dict:
    """The Gloo operations of one call with and without stats, per algorithm, and of the
    planted reducer that sends one more."""
    reducers = {algorithm: adasum.Adasum(algorithm=algorithm) for algorithm in ("vhdd", "gather")}
    reducers["planted"] = _OneMoreMessage()
    out = {}
    for name, reducer in reducers.items():
        for stats in (False, True):
            reducer.all_reduce(rank_inputs(rank), stats=stats)  # warm: groups and buffers made
            out[(name, stats)] = messages(lambda: reducer.all_reduce(rank_inputs(rank), stats=stats))
    return out


def extra_messages(off: Counter, on: Counter) -> Counter:
    """What a call with stats sends beyond the call without."""
    return on - off


def stats_cost_at_most_one_small_message(off: Counter, on: Counter) -> bool:
    extra = extra_messages(off, on)
    # The partner messages grow by a few numbers each, never in count; at most one gather.
    return on["gloo:send"] == off["gloo:send"] and sum(extra.values()) <= 1 and set(extra) <= {"gloo:all_gather"}


@pytest.mark.parametrize("world", [3, 4])
def test_stats_cost_at_most_one_small_message(world):
    results = spawn(_messages, world, timeout=TIMEOUT)
    for res in results:
        for algorithm in ("vhdd", "gather"):
            off, on = res[(algorithm, False)], res[(algorithm, True)]
            assert off["gloo:send"] + off["gloo:all_gather"] > 0  # the profiler saw the call
            assert stats_cost_at_most_one_small_message(off, on), (algorithm, off, on)
        # The check fails on a planted extra message.
        assert not stats_cost_at_most_one_small_message(res[("planted", False)], res[("planted", True)])


def _agreements(rank: int, world: int) -> dict:
    """The public validation path: check() with a front door's options and error, and a
    reduction handed the agreement, which skips its round."""
    reducer, last = adasum.Adasum(), rank == world - 1
    out = {}
    for name, call in [
        ("check", lambda x: reducer.check(x, options={"mode": "delta"})),
        ("all_reduce", lambda x: reducer.all_reduce(x)),
        ("agreed", lambda x: reducer.all_reduce(x, agreement=reducer.check(x))),
    ]:
        x = rank_inputs(rank)
        returned = []
        sent = messages(lambda: returned.append(call(x)))
        out[name] = (sent["gloo:send"], x, type(returned[0]).__name__)
    out["options"] = caught(lambda: reducer.check(rank_inputs(rank), options={"mode": "gradient" if last else "delta"}))
    out["error"] = caught(lambda: reducer.check(rank_inputs(rank), error=ValueError("bad input") if rank == 1 else None))
    made = reducer.check(rank_inputs(rank))
    out["other tensors"] = caught(lambda: reducer.all_reduce(rank_inputs(rank)[:1], agreement=made))
    out["other stats"] = caught(lambda: reducer.all_reduce(rank_inputs(rank), stats=True, agreement=made))
    wide = [t for t in rank_inputs(rank) if t.dtype == torch.float64]  # a flat buffer has one dtype
    flat, numels = torch.cat([t.reshape(-1) for t in wide]), [t.numel() for t in wide]
    flat_agreement = reducer.check_flat(flat, numels)
    reducer.all_reduce_flat(flat, numels, agreement=flat_agreement)
    out["flat"] = flat
    return out


def test_check_returns_an_agreement_that_spares_the_reduction_its_round():
    world = 3
    results = spawn(_agreements, world, timeout=TIMEOUT)
    want = adasum.reduce([rank_inputs(r) for r in range(world)])
    for r in results:
        check, plain, agreed = r["check"][0], r["all_reduce"][0], r["agreed"][0]
        # The check's messages and the reduction's add up to a plain all_reduce: no second round.
        assert check > 0 and agreed == plain
        assert same_bits(r["agreed"][1], want) and same_bits(r["all_reduce"][1], want)
        wide = adasum.reduce([[t for t in rank_inputs(k) if t.dtype == torch.float64] for k in range(world)])
        assert same_bits(r["flat"], torch.cat([t.reshape(-1) for t in wide]))
        assert r["check"][2] == "Agreement" and r["agreed"][2] == r["all_reduce"][2] == "NoneType"
        assert r["options"] == f"ValueError: adasum: mode=gradient on rank {world - 1} but mode=delta on rank 0"
        assert r["error"] == "ValueError: adasum: rank 1: bad input"
        for key in ("other tensors", "other stats"):
            assert r[key].startswith("ValueError: adasum: the agreement passed to Adasum.all_reduce"), r[key]


def _lifecycle(rank: int, world: int) -> dict:
    reducer = adasum.Adasum(algorithm="vhdd")
    for n in (1000, 100_000, 10):
        reducer.all_reduce([torch.randn(n), torch.randn(n, dtype=torch.float64)])
    kept = reducer._buffers.numels()
    reducer.close()
    emptied = len(reducer._buffers.numels())
    again = torch.full((4,), float(rank))
    reducer.all_reduce(again)  # usable after close
    state = AdasumState(adasum.Adasum())
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    model.register_comm_hook(state, adasum_hook)
    model(torch.randn(4, 3)).sum().backward()
    hook_group_timeout = timeout_of(state._background._group)
    thread_alive = state._background._executor is not None
    state.close()
    hierarchical = adasum.Hierarchical(2)
    hierarchical.all_reduce(torch.ones(3))
    intra, across = hierarchical._groups()
    return {
        "kept": kept, "emptied": emptied, "again": again, "thread_alive": thread_alive,
        "closed": state._background._executor is None and state._background._worker is None,
        "timeouts": [timeout_of(None), hook_group_timeout, timeout_of(intra), timeout_of(across.group)],
    }


def test_buffers_are_bounded_and_closed_and_groups_inherit_the_timeout():
    results = spawn(_lifecycle, 4, timeout=23)
    for res in results:
        # The largest slice received at level 1 of two ranks' halving: half of 100,000 elements.
        assert res["kept"] == {"recv torch.float32": 50_000, "recv torch.float64": 50_000}
        assert res["emptied"] == 0
        assert torch.equal(res["again"], adasum.reduce([torch.full((4,), float(r)) for r in range(4)]))
        assert res["thread_alive"] and res["closed"]
        assert res["timeouts"] == [timedelta(seconds=23)] * 4


def test_reducers_pickle_without_their_group_and_keep_their_options():
    for reducer in (adasum.Adasum(group=object(), algorithm="gather"), adasum.Hierarchical(4, group=object()),
                    adasum.Average(group=object())):
        copy_ = pickle.loads(pickle.dumps(reducer))
        assert copy_.group is None and repr(copy_) == repr(reducer)
    moved = adasum.Adasum(algorithm="vhdd").with_group("g")
    assert moved.group == "g" and moved.algorithm == "vhdd" and moved._buffers.numels() == {}


def test_bad_settings_are_refused_at_construction(monkeypatch):
    with pytest.raises(ValueError, match="algorithm must be one of"):
        adasum.Adasum(algorithm="ring")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        adasum.Hierarchical()
    with pytest.raises(ValueError, match="at least 1"):
        adasum.Hierarchical(0)
    with pytest.raises(TypeError, match="adasum.Reducer"):
        DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), "adasum")


def test_single_process_references_agree_with_the_definitions():
    a, b, c = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0]))
    assert torch.equal(adasum.Sum().reduce([a, b, c]), a + b + c)
    assert torch.allclose(adasum.Average().reduce([a, b, c]), (a + b + c) / 3)
    assert torch.equal(adasum.Adasum().reduce([a, b]), a + b)  # orthogonal: summed
    # Two nodes of two: the node averages, then Adasum of the two.
    nodes = adasum.Hierarchical(2).reduce([a, b, c, c])
    assert torch.allclose(nodes, adasum.combine((a + b) / 2, c))
