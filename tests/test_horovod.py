"""adasum.horovod, Horovod's PyTorch API, on real Gloo groups.

One spawn per world size (2, 3, 4) runs every collective on inputs each rank derives from its
rank; the parent rebuilds all ranks' inputs and checks the results against independent
references (torch sums in float64, ``adasum.reduce``, slicing). One spawn of 3 ranks runs the
optimizer (against a single-process replay), autograd and the bad-input scenarios; one test
runs a Horovod-style script under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adasum
import adasum.horovod as hvd
from adasum.launch import spawn
from conftest import TIMEOUT, same_bits

ROOT = Path(__file__).resolve().parents[1]


# -- inputs every rank derives from its rank, and the parent from all ranks -------------------

def inputs(rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "bf16": torch.randn(6, generator=g).to(torch.bfloat16),
        "i32": torch.randint(-100, 100, (7,), generator=g, dtype=torch.int32),
        "small": torch.rand(4, generator=g, dtype=torch.float64) + 0.5,
        "rows": torch.full((rank + 1, 2), float(rank)),
        "a2a": torch.arange(sum(s + 1 for s in range(world)), dtype=torch.float32) + 100 * rank,
        "scatter": torch.randn(2 * world + 1, 3, generator=g),
        "i16": torch.randint(-3000, 3000, (2 * world, 2), generator=g, dtype=torch.int16),
    }


def _collectives(rank: int, world: int) -> dict:
    hvd.init()
    out = _run_collectives(rank, world)
    hvd.shutdown()
    return out


def _run_collectives(rank: int, world: int) -> dict:
    x = inputs(rank, world)
    out = {
        "average": hvd.allreduce(x["f32"]),
        "sum": hvd.allreduce(x["f32"], op=hvd.Sum),
        "average_int": hvd.allreduce(x["i32"], average=True),
        "sum_int": hvd.allreduce(x["i32"], op=hvd.Sum),
        "min": hvd.allreduce(x["small"], op=hvd.Min),
        "max": hvd.allreduce(x["small"], op=hvd.Max),
        "product": hvd.allreduce(x["small"], op=hvd.Product),
        "adasum": hvd.allreduce(x["f32"], op=hvd.Adasum),
        "adasum_grouped": hvd.grouped_allreduce([x["f32"], x["f64"], x["bf16"]], op=hvd.Adasum),
        "scaled": hvd.allreduce(x["f32"], op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0),
        "fp16": hvd.allreduce(x["f32"], op=hvd.Sum, compression=hvd.Compression.fp16),
        "sum_bf16": hvd.grouped_allreduce([x["bf16"], x["f64"]], op=hvd.Sum),
        "allgather": hvd.allgather(x["rows"]),
        "grouped_allgather": hvd.grouped_allgather([x["rows"], x["f64"]]),
        "broadcast": hvd.broadcast(x["f32"], root_rank=world - 1),
        "unchanged": x["f32"].clone(),
        "alltoall": hvd.alltoall(x["a2a"], splits=[s + 1 for s in range(world)]),
        "alltoall_equal": hvd.alltoall(torch.arange(2 * world) + 10 * rank),
        "reducescatter": hvd.reducescatter(x["scatter"], op=hvd.Sum),
        "object": hvd.broadcast_object({"from": rank}, root_rank=1),
        "objects": hvd.allgather_object(("rank", rank)),
        # Gloo and NCCL have no int16 (Horovod's tests gather, broadcast and exchange it).
        "i16": [hvd.allgather(x["i16"]), hvd.broadcast(x["i16"], root_rank=world - 1), hvd.alltoall(x["i16"]),
                hvd.allreduce(x["i16"], op=hvd.Sum), hvd.allreduce(x["i16"], op=hvd.Average)],
    }
    inplace = x["f32"].clone()
    out["inplace_is_input"] = hvd.allreduce_(inplace, op=hvd.Sum) is inplace
    out["inplace"] = inplace
    bcast = x["f64"].clone()
    hvd.broadcast_(bcast, root_rank=0)
    out["broadcast_"] = bcast
    handles = [hvd.allreduce_async(x["f32"], op=hvd.Sum), hvd.grouped_allreduce_async_([x["f64"].clone()], op=hvd.Average),
               hvd.allreduce_async(x["f32"], op=hvd.Adasum), hvd.allgather_async(x["rows"])]
    out["async"] = [hvd.synchronize(h) for h in handles]
    out["polled"] = all(hvd.poll(h) for h in handles)
    hvd.barrier()
    out["join"] = hvd.join()
    out["topology"] = (hvd.is_initialized(), hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(),
                       hvd.cross_rank(), hvd.cross_size())
    return out


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"{n}ranks")
def collectives(request):
    world = request.param
    if world == WORLD:  # the group of three runs them with everything else: one spawn fewer
        return world, [out["collectives"] for out in request.getfixturevalue("three")]
    return world, spawn(_collectives, world, timeout=TIMEOUT)


def _all(world: int, key: str) -> list[torch.Tensor]:
    return [inputs(r, world)[key] for r in range(world)]


def test_sum_average_min_max_product_match_torch(collectives):
    world, results = collectives
    f32 = torch.stack(_all(world, "f32")).double()
    small = torch.stack(_all(world, "small"))
    i32 = torch.stack(_all(world, "i32")).long()
    for r, out in enumerate(results):
        torch.testing.assert_close(out["sum"].double(), f32.sum(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(out["average"].double(), f32.mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(out["inplace"].double(), f32.sum(0), rtol=0, atol=1e-5)
        assert out["inplace_is_input"]
        assert torch.equal(out["sum_int"], i32.sum(0).int())
        # Integer averages round toward zero, as Horovod's do.
        assert torch.equal(out["average_int"], torch.div(i32.sum(0), world, rounding_mode="trunc").int())
        assert torch.equal(out["min"], small.min(0).values) and torch.equal(out["max"], small.max(0).values)
        torch.testing.assert_close(out["product"], small.prod(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(out["scaled"].double(), 3.0 * (0.5 * f32).sum(0), rtol=0, atol=1e-5)
        fp16_sum = torch.stack([t.half().float() for t in _all(world, "f32")]).sum(0)
        assert out["fp16"].dtype == torch.float32
        torch.testing.assert_close(out["fp16"], fp16_sum.half().float(), rtol=2e-3, atol=2e-3)
        # bfloat16 is summed in float32 and rounded once.
        bf16_sum = torch.stack([t.float() for t in _all(world, "bf16")]).sum(0).to(torch.bfloat16)
        assert torch.equal(out["sum_bf16"][0], bf16_sum)
        assert torch.equal(out["unchanged"], inputs(r, world)["f32"])  # out of place: the input is kept


def test_adasum_is_adasum_reduce_bit_identical_on_every_rank(collectives):
    world, results = collectives
    expected = adasum.reduce(_all(world, "f32"))
    grouped = adasum.reduce([[x["f32"], x["f64"], x["bf16"]] for x in (inputs(r, world) for r in range(world))])
    for out in results:
        assert same_bits(out["adasum"], results[0]["adasum"])
        assert same_bits(out["adasum_grouped"], results[0]["adasum_grouped"])
        torch.testing.assert_close(out["adasum"], expected, rtol=1e-6, atol=1e-6)
        for got, want in zip(out["adasum_grouped"], grouped):
            torch.testing.assert_close(got, want, rtol=1e-2 if want.dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_allgather_broadcast_alltoall_reducescatter(collectives):
    world, results = collectives
    rows = torch.cat(_all(world, "rows"))
    scatter = torch.stack(_all(world, "scatter")).double().sum(0)
    q, m = divmod(scatter.shape[0], world)
    for r, out in enumerate(results):
        assert torch.equal(out["allgather"], rows)
        assert torch.equal(out["grouped_allgather"][0], rows)
        assert torch.equal(out["grouped_allgather"][1], torch.cat(_all(world, "f64")))
        assert torch.equal(out["broadcast"], inputs(world - 1, world)["f32"])
        assert torch.equal(out["broadcast_"], inputs(0, world)["f64"])
        # Rank s sends rows [offset_s, offset_s + s + 1) of its tensor... to rank s: from every
        # rank r' this rank receives its block number r (r + 1 rows).
        start = sum(s + 1 for s in range(r))
        received, counts = out["alltoall"]
        want = torch.cat([x[start:start + r + 1] for x in _all(world, "a2a")])
        assert torch.equal(received, want) and counts.tolist() == [r + 1] * world
        assert out["alltoall_equal"].tolist() == [10 * s + i for s in range(world) for i in (2 * r, 2 * r + 1)]
        lo = r * q + min(r, m)
        torch.testing.assert_close(out["reducescatter"].double(), scatter[lo: lo + q + (r < m)], rtol=0, atol=1e-5)
        assert out["object"] == {"from": 1}
        assert out["objects"] == [("rank", s) for s in range(world)]
        assert same_bits(out["async"][0], out["sum"]) and same_bits(out["async"][2], out["adasum"])
        assert torch.equal(out["async"][3], rows) and out["polled"]
        assert out["join"] == results[0]["join"] and 0 <= out["join"] < world
        i16 = _all(world, "i16")
        gathered, broadcast, exchanged, summed, averaged = out["i16"]
        assert all(t.dtype == torch.int16 for t in out["i16"])
        assert torch.equal(gathered, torch.cat(i16)) and torch.equal(broadcast, i16[-1])
        assert torch.equal(exchanged, torch.cat([x[2 * r: 2 * r + 2] for x in i16]))
        total = torch.stack(i16).long().sum(0)
        assert torch.equal(summed.long(), total)  # |sum| < 2**15: no wrap
        assert torch.equal(averaged.long(), torch.div(total, world, rounding_mode="trunc"))
        # spawn's workers are one node: LOCAL_RANK = RANK, LOCAL_WORLD_SIZE = WORLD_SIZE
        assert out["topology"] == (True, r, world, r, world, 0, 1)


# -- the optimizer, autograd and bad input: one group of 3 ---------------------------------

WORLD = 3


def _model(rank: int) -> torch.nn.Module:
    torch.manual_seed(rank)  # different on every rank: broadcast_parameters must equalise them
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(31 * rank + step)
    return torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)


def _loss(model: torch.nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = _batch(rank, step)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(rank: int, scenario: str) -> dict:
    """Two updates; returns the start, each update's local (accumulated) gradients and the
    parameters after each update."""
    model = _model(rank)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    start = [p.detach().clone() for p in model.parameters()]
    passes = 2 if scenario == "adam_adasum" else 1
    if scenario == "sgd_average":
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                       named_parameters=model.named_parameters())
    elif scenario == "sgd_clip":
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Sum)
    else:
        opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), op=hvd.Adasum,
                                       named_parameters=model.named_parameters(), backward_passes_per_step=passes)
    grads, after = [], []
    for step in range(2):
        opt.zero_grad()
        for micro in range(passes):
            _loss(model, rank, 2 * step + micro).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if scenario == "sgd_clip":
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        after.append([p.detach().clone() for p in model.parameters()])
    return {"start": start, "grads": grads, "after": after}


def _amp(rank: int) -> dict:
    """Gradient mode with a GradScaler, as docs/horovod.md shows: an overflow on one rank makes
    every rank skip the step and back off alike. A learning-rate scheduler drives the wrapper."""
    model = _model(0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params, scales = [], []
    for step in range(2):
        opt.zero_grad()
        scaler.scale(_loss(model, rank, step)).backward()
        if step == 1 and rank == WORLD - 1:
            next(model.parameters()).grad[0, 0] = float("inf")
        opt.synchronize()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        scheduler.step()
        params.append([p.detach().clone() for p in model.parameters()])
        scales.append(scaler.get_scale())
    return {"params": params, "scales": scales, "lr": opt.param_groups[0]["lr"]}


def _sparse_fp16(rank: int) -> dict:
    """Gradient mode with a sparse embedding: refused without sparse_as_dense (on every rank),
    reduced as dense and compressed to float16 with it."""
    out = {}
    for as_dense in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(6, 3, sparse=True), torch.nn.Linear(3, 1))
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), sparse_as_dense=as_dense,
                                       compression=hvd.Compression.fp16)
        start = [p.detach().clone() for p in model.parameters()]
        model(torch.tensor([rank, rank + 1, 5])).sum().backward()
        grads = [p.grad.to_dense().clone() for p in model.parameters()]
        try:
            opt.step()
        except hvd.MismatchError as e:
            out["refused"] = str(e)
            continue
        out.update(start=start, grads=grads, after=[p.detach().clone() for p in model.parameters()])
    return out


def _autograd(rank: int) -> dict:
    w = torch.arange(3.0) + rank
    out = {}
    for name, op in (("sum", hvd.Sum), ("average", hvd.Average), ("max", hvd.Max)):
        x = (torch.tensor([1.0, 2.0, 3.0]) * (rank if name == "max" else 1)).requires_grad_()
        (hvd.allreduce(x, op=op) * w).sum().backward()
        out[name] = x.grad
    x = torch.full((rank + 1, 3), 1.0, requires_grad=True)
    (hvd.allgather(x) * (rank + 1)).sum().backward()
    out["allgather"] = x.grad
    x = torch.ones(3, requires_grad=True)
    (hvd.broadcast(x, root_rank=1) * w).sum().backward()
    out["broadcast"] = x.grad
    for name, op in (("reducescatter_sum", hvd.Sum), ("reducescatter_average", hvd.Average)):
        x = torch.ones(2 * WORLD + 1, 2, requires_grad=True)  # blocks of 3, 2, 2 rows
        (hvd.reducescatter(x, op=op, prescale_factor=0.5, postscale_factor=3.0) * (rank + 1)).sum().backward()
        out[name] = x.grad
    # alltoall only moves rows: with loss = |y|^2 / 2 the output gradient is y itself, and sent
    # back the way each row came it must land on the row that was sent: x.grad == x.
    x = (torch.arange(sum(s + 1 for s in range(WORLD)), dtype=torch.float64) + 100 * rank).requires_grad_()
    y, _ = hvd.alltoall(x, splits=[s + 1 for s in range(WORLD)])
    (y.square() / 2).sum().backward()
    out["alltoall"] = (x.detach(), x.grad)
    x = (torch.arange(2.0 * WORLD) + 10 * rank).reshape(WORLD, 2).requires_grad_()
    (hvd.alltoall(x).square() / 2).sum().backward()
    out["alltoall_equal"] = (x.detach(), x.grad)
    return out


def _bad_inputs(rank: int) -> dict:
    """Each scenario: the error every rank raised (None where one returned)."""
    def caught(fn) -> str | None:
        try:
            fn()
        except RuntimeError as e:  # MismatchError is a RuntimeError too, as Horovod's errors
            return f"{type(e).__name__}: {e}"
        return None

    last = rank == WORLD - 1
    return {
        "shape": caught(lambda: hvd.allreduce(torch.ones(3 + last))),
        "dtype": caught(lambda: hvd.allreduce(torch.ones(3, dtype=torch.float64 if last else torch.float32))),
        "op": caught(lambda: hvd.allreduce(torch.ones(3), op=hvd.Sum if last else hvd.Adasum)),
        "adasum_int": caught(lambda: hvd.allreduce(torch.ones(3, dtype=torch.int64), op=hvd.Adasum)),
        "root": caught(lambda: hvd.broadcast(torch.ones(2), root_rank=7 if last else 0)),
        "splits": caught(lambda: hvd.alltoall(torch.ones(3), splits=[1, 1, 2] if last else [1, 1, 1])),
        "allgather": caught(lambda: hvd.allgather(torch.ones(2, 3 + last))),
        "allgather_scalar": caught(lambda: hvd.allgather(torch.tensor(1.0) if last else torch.ones(1))),
        "join": caught(lambda: hvd.join() if last else hvd.allreduce(torch.ones(2))),
        # Horovod matched operations by name; issued in different orders, they must not pair.
        "names": caught(lambda: [hvd.allreduce(torch.ones(2), name=n) for n in (("b", "a") if last else ("a", "b"))]),
        "optimizer": caught(lambda: _mismatched_step(rank)),
        "still_works": hvd.allreduce(torch.ones(2), op=hvd.Sum),
    }


def _mismatched_step(rank: int) -> None:
    model = torch.nn.Linear(3, 2 + (rank == WORLD - 1))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()


def _optimizer_state(rank: int) -> dict:
    model = _model(rank)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (rank + 1))
    if rank == 0:
        _loss(model, 0, 0).backward()
        opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state = opt.state_dict()
    return {"lr": state["param_groups"][0]["lr"], "moments": [s["exp_avg"] for s in state["state"].values()]}


def _duplicates(rank: int) -> str | None:
    model = torch.nn.Linear(2, 2)
    named = [("w", model.weight), ("w", model.bias)]
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named)
    except ValueError as e:
        return str(e)
    return None


def _group_of_three(rank: int, world: int) -> dict:
    hvd.init()
    out = {s: _train(rank, s) for s in ("sgd_average", "sgd_clip", "adam_adasum")}
    out["collectives"] = _run_collectives(rank, world)
    out["autograd"] = _autograd(rank)
    out["amp"] = _amp(rank)
    out["sparse_fp16"] = _sparse_fp16(rank)
    out["bad"] = _bad_inputs(rank)
    out["optimizer_state"] = _optimizer_state(rank)
    out["duplicates"] = _duplicates(rank)
    hvd.shutdown()
    return out


@pytest.fixture(scope="module")
def three():
    return spawn(_group_of_three, WORLD, timeout=TIMEOUT)


def _replay_gradient_mode(run: list[dict], make, reduce, clip: float | None = None) -> list[list[torch.Tensor]]:
    """One model in one process, stepped on the reduction of the ranks' recorded gradients."""
    params = [p.clone().requires_grad_() for p in run[0]["start"]]
    opt = make(params)
    after = []
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = reduce([r["grads"][step][i] for r in run])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        after.append([p.detach().clone() for p in params])
    return after


def _replay_delta_mode(run: list[dict]) -> list[list[torch.Tensor]]:
    """Every rank's own Adam from the common parameters, the deltas through adasum.reduce."""
    x = [p.clone() for p in run[0]["start"]]
    ranks = [[p.clone().requires_grad_() for p in x] for _ in run]
    opts = [torch.optim.Adam(ps, lr=0.01) for ps in ranks]
    after = []
    for step in range(2):
        deltas = []
        for r, (ps, opt) in enumerate(zip(ranks, opts)):
            with torch.no_grad():
                for p, v, g in zip(ps, x, run[r]["grads"][step]):
                    p.copy_(v)
                    p.grad = g.clone()
            opt.step()
            deltas.append([p.detach() - v for p, v in zip(ps, x)])
        x = [v + d for v, d in zip(x, adasum.reduce(deltas))]
        after.append(x)
    return after


@pytest.mark.parametrize("scenario", ["sgd_average", "sgd_clip", "adam_adasum"])
def test_optimizer_matches_single_process_replay(three, scenario):
    run = [out[scenario] for out in three]
    for r in run:
        assert all(same_bits(p, q) for p, q in zip(r["start"], run[0]["start"]))  # broadcast_parameters
        for step in range(2):
            assert same_bits(r["after"][step], run[0]["after"][step])  # bit-identical replicas
    stack = lambda ts: torch.stack([t.double() for t in ts])  # noqa: E731
    if scenario == "sgd_average":
        want = _replay_gradient_mode(run, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                     lambda gs: stack(gs).mean(0).float())
    elif scenario == "sgd_clip":
        want = _replay_gradient_mode(run, lambda ps: torch.optim.SGD(ps, lr=0.1),
                                     lambda gs: stack(gs).sum(0).float(), clip=0.05)
    else:
        want = _replay_delta_mode(run)
    for step in range(2):
        for got, ref in zip(run[0]["after"][step], want[step]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not all(same_bits(a, b) for a, b in zip(run[0]["after"][1], run[0]["start"]))  # it moved


def test_amp_overflow_on_one_rank_skips_the_step_on_every_rank(three):
    start = [p.detach() for p in _model(0).parameters()]
    for out in three:
        amp = out["amp"]
        assert same_bits(amp["params"][0], three[0]["amp"]["params"][0])
        assert not same_bits(amp["params"][0], start)  # the first step moved
        assert same_bits(amp["params"][1], amp["params"][0])  # the second was skipped everywhere
        assert amp["scales"] == [2.0**8, 2.0**7]  # and every scaler backed off once
        assert amp["lr"] == 0.1 * 0.5**2


def test_sparse_gradients_as_dense_compressed_to_fp16(three):
    runs = [out["sparse_fp16"] for out in three]
    for run in runs:
        assert "sparse_as_dense=True" in run["refused"]  # every rank, the first attempt
        assert same_bits(run["after"], runs[0]["after"])
    for i, (start, after) in enumerate(zip(runs[0]["start"], runs[0]["after"])):
        mean = torch.stack([run["grads"][i].half().float() for run in runs]).mean(0)
        torch.testing.assert_close(after, start - 0.5 * mean, rtol=2e-3, atol=2e-3)
    assert not same_bits(runs[0]["after"][0], runs[0]["start"][0])


def test_autograd_of_allreduce_allgather_broadcast_reducescatter_alltoall(three):
    w = [torch.arange(3.0) + r for r in range(WORLD)]
    total = torch.stack(w).sum(0)
    for r, out in enumerate(three):
        g = out["autograd"]
        torch.testing.assert_close(g["sum"], total)
        torch.testing.assert_close(g["average"], total / WORLD)
        # max: the input of the last rank is the result, so only it gets the summed gradient.
        torch.testing.assert_close(g["max"], total if r == WORLD - 1 else torch.zeros(3))
        # allgather: this rank's rows of the average of the output gradients (Horovod's rule).
        torch.testing.assert_close(g["allgather"], torch.full((r + 1, 3), sum(range(1, WORLD + 1)) / WORLD))
        torch.testing.assert_close(g["broadcast"], total / WORLD if r == 1 else torch.zeros(3))
        # reducescatter, Horovod's gradient: block b of the input gets (b + 1), the output
        # gradient of rank b, times prescale * postscale, times WORLD for Sum (WORLD times
        # the derivative of the summed losses, for Sum and Average alike).
        blocks = torch.cat([torch.full((3 if b == 0 else 2, 2), float(b + 1)) for b in range(WORLD)])
        torch.testing.assert_close(g["reducescatter_sum"], blocks * 1.5 * WORLD)
        torch.testing.assert_close(g["reducescatter_average"], blocks * 1.5)
        for key in ("alltoall", "alltoall_equal"):
            sent, grad = g[key]
            assert same_bits(grad, sent), key


def test_bad_input_raises_on_every_rank(three):
    bad = [out["bad"] for out in three]
    expected = {
        "shape": "tensor 0 is (4,) float32 cpu on rank 2 but (3,) float32 cpu on rank 0",
        "dtype": "tensor 0 is (3,) float64 cpu on rank 2 but (3,) float32 cpu on rank 0",
        "op": "op='Sum' on rank 2 but op='Adasum' on rank 0",
        "adasum_int": "rank 0: tensor 0 is int64; Adasum needs",
        "root": "rank 2: root_rank=7 is not a rank of the 3 processes",
        "splits": "rank 2: splits add up to 4, dimension 0 is 3",
        "allgather": "tensor 0 is (*, 4) float32 cpu on rank 2 but (*, 3) float32 cpu on rank 0",
        "allgather_scalar": "hvd.allgather: rank 2: tensor 0 has 0 dimensions",
        "join": "operation='join' on rank 2 but operation='allreduce' on rank 0",
        "names": "name='b' on rank 2 but name='a' on rank 0",
        "optimizer": "on rank 2 but",
    }
    for key, text in expected.items():
        for r, b in enumerate(bad):
            assert b[key] is not None and b[key].startswith("MismatchError: hvd."), (key, r, b[key])
            assert text in b[key], (key, r, b[key])
    for b in bad:
        assert torch.equal(b["still_works"], torch.full((2,), float(WORLD)))  # nothing left in flight


def test_broadcast_optimizer_state_and_duplicate_names(three):
    root = three[0]["optimizer_state"]
    assert root["moments"]  # rank 0 stepped
    for out in three:
        assert out["optimizer_state"]["lr"] == root["lr"] == 0.01
        assert same_bits(out["optimizer_state"]["moments"], root["moments"])
        assert "duplicates: w" in out["duplicates"]


# -- launching -------------------------------------------------------------------------------

def test_init_without_torchrun_says_how_to_launch(monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("this process already holds a process group, which init would adopt")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        hvd.init()
    assert not hvd.is_initialized()
    with pytest.raises(ValueError, match=r"call hvd.init\(\) first"):
        hvd.rank()


def test_build_queries_without_init():
    # Horovod's tests ask these before hvd.init(); there is no oneCCL, DDL or MPI here.
    assert (hvd.ccl_built(), hvd.ddl_built(), hvd.mpi_built(), hvd.mpi_enabled()) == (False,) * 4
    assert hvd.rocm_built() is (torch.version.hip is not None and torch.cuda.is_available())


def test_unoffered_api_says_what_to_use():
    with pytest.raises(NotImplementedError, match="torch.nn.SyncBatchNorm"):
        hvd.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="gradient_predivide_factor needs op=Average"):
        hvd.DistributedOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), op=hvd.Sum,
                                 gradient_predivide_factor=2.0)


def test_horovod_script_under_torchrun(tmp_path):
    """examples/horovod_adasum.py, written against Horovod's API with only the import
    changed (and the optimizer freed before exit), trains with Adasum on 3 torchrun workers (not a
    power of two)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=3", str(ROOT / "examples" / "horovod_adasum.py"),
         "--use-adasum", "--steps", "30"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("loss")]
    assert len(lines) == 1, done.stdout  # rank 0 alone reports
    words = lines[0].split()  # loss FIRST -> LAST
    first, last = float(words[1]), float(words[3])
    assert last < 0.5 * first, lines[0]


RESTART = """
import os
import torch
import adasum.horovod as hvd
for start in range(3):
    hvd.init()
    total = hvd.allreduce(torch.ones(2), op=hvd.Sum)
    hvd.barrier()
    hvd.shutdown()
if os.environ["RANK"] == "0":  # torchrun's exit status says that the other rank finished too
    print("restarts", start, int(total[0]))
"""


def test_init_after_shutdown_under_torchrun(tmp_path):
    """init -> shutdown -> init starts a working group again (it used to wait forever reading
    the previous group's keys in torchrun's store); Horovod's Gloo tests restart after each test."""
    script = tmp_path / "restart.py"
    script.write_text(RESTART)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(script)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "restarts 2 2" in done.stdout, done.stdout
