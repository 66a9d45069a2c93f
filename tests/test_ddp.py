"""The DDP communication hook on real Gloo groups.

One spawn of 4 ranks trains a small mixed-dtype model with momentum SGD through DDP and the
Adasum hook (several buckets, a branch only some ranks use, no_sync accumulation) and, next to
it, computes each rank's local gradients with a plain copy of the model. The parent checks the
combined gradients against ``adasum.reduce`` of the local ones and replays the whole run.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import adasum
import adasum._reducer
from adasum.ddp import AdasumState, adasum_hook
from adasum.launch import spawn
from conftest import TIMEOUT, bits

WORLD = 4
# (micro-batches per step) for each step: accumulation with no_sync on the later steps.
MICRO = [1, 1, 2, 3]
LR, MOMENTUM = 0.05, 0.9


class MixedNet(torch.nn.Module):
    """float32 and float64 layers (so DDP builds buckets of both dtypes) and a branch that
    only even ranks use (find_unused_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.hidden = torch.nn.Linear(12, 10).double()
        self.out = torch.nn.Linear(10, 3)
        self.branch = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.inp(x)).double()
        y = self.out(torch.tanh(self.hidden(h)).float())
        return y + self.branch(x) if use_branch else y


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def loss_of(model, rank: int, step: int, micro: int) -> torch.Tensor:
    x, y = batch(rank, step, micro)
    return torch.nn.functional.mse_loss(model(x, use_branch=rank % 2 == 0), y)


def grads_or_zeros(module: torch.nn.Module) -> list[torch.Tensor]:
    return [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for p in module.parameters()
    ]


def _train(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = MixedNet()
    # Tiny buckets: layers of one model land in several buckets.
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.0005)
    state = AdasumState(stats=True, named_parameters=model.named_parameters())
    seen: set[int] = set()
    layouts: set[tuple] = set()
    calls = {"hook": 0, "agree": 0}

    def counting_hook(st, bucket):  # unannotated: DDP checks annotations against real types
        seen.add(bucket.index())
        layouts.add((bucket.index(), tuple(g.numel() for g in bucket.gradients()), bucket.buffer().dtype))
        calls["hook"] += 1
        return adasum_hook(st, bucket)

    agree = adasum._reducer.agree

    def counting_agree(*args, **kwargs):
        calls["agree"] += 1
        return agree(*args, **kwargs)

    adasum._reducer.agree = counting_agree

    ddp.register_comm_hook(state, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    shadow = copy.deepcopy(model)
    out = {"initial": [p.detach().clone() for p in model.parameters()], "local": [], "combined": [],
           "params": []}
    for step, micro in enumerate(MICRO):
        shadow.load_state_dict(model.state_dict())
        shadow.zero_grad(set_to_none=True)
        for m in range(micro):
            loss_of(shadow, rank, step, m).backward()
        out["local"].append(grads_or_zeros(shadow))
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            if m < micro - 1:
                with ddp.no_sync():
                    loss_of(ddp, rank, step, m).backward()
            else:
                loss_of(ddp, rank, step, m).backward()
        out["combined"].append(grads_or_zeros(model))
        opt.step()
        out["params"].append([p.detach().clone() for p in model.parameters()])
    out["stats"] = state.last_stats.summary(batch=4)  # with the noise scale of the gradients
    state.close()
    adasum._reducer.agree = agree
    out["calls"], out["layouts"] = calls, len(layouts)
    out["buckets"] = len(seen)
    out["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["world"] = dist.get_world_size()
    out["baselines"] = {name: _baseline_step(rank, name) for name in ("average", "sum")}
    return out


def _baseline_step(rank: int, name: str) -> dict:
    """One step through the same hook with a baseline reducer: its local and reduced gradients."""
    torch.manual_seed(0)
    model = MixedNet()
    shadow = copy.deepcopy(model)
    loss_of(shadow, rank, 0, 0).backward()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.0005)
    reducer = {"average": adasum.Average(), "sum": adasum.Sum()}[name]
    with AdasumState(reducer) as state:
        ddp.register_comm_hook(state, adasum_hook)
        loss_of(ddp, rank, 0, 0).backward()
    return {"local": grads_or_zeros(shadow), "reduced": grads_or_zeros(model)}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return spawn(_train, WORLD, timeout=TIMEOUT)


def test_combined_gradients_are_adasum_of_local_ones(runs):
    for step in range(len(MICRO)):
        expected = adasum.reduce([r["local"][step] for r in runs])
        for got, ref in zip(runs[0]["combined"][step], expected):
            assert got.dtype == ref.dtype
            tol = 1e-12 if ref.dtype == torch.float64 else 2e-6
            assert torch.allclose(got, ref, rtol=tol, atol=tol), step
        for r in runs[1:]:
            for a, b in zip(runs[0]["combined"][step], r["combined"][step]):
                assert torch.equal(bits(a), bits(b))


def test_unused_branch_is_combined_with_zeros(runs):
    # The branch is used on ranks 0 and 2 only: ranks 1 and 3 contribute zero gradients, which
    # Adasum's zero guard passes through; the branch's combined gradient is Adasum(g0, g2).
    branch = [i for i, (n, _) in enumerate(MixedNet().named_parameters()) if n.startswith("branch")]
    for step in range(len(MICRO)):
        for i in branch:
            assert torch.count_nonzero(runs[1]["local"][step][i]) == 0
            expected = adasum.combine(runs[0]["local"][step][i], runs[2]["local"][step][i])
            assert torch.allclose(runs[0]["combined"][step][i], expected, rtol=2e-6, atol=1e-7)


def test_parameters_follow_momentum_sgd_on_the_reduced_gradients(runs):
    # An independent replay: one model, SGD with momentum, gradients from adasum.reduce.
    params = [torch.nn.Parameter(p.clone()) for p in runs[0]["initial"]]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for step in range(len(MICRO)):
        for p, g in zip(params, adasum.reduce([r["local"][step] for r in runs])):
            p.grad = g
        opt.step()
        for p, got in zip(params, runs[0]["params"][step]):
            tol = 1e-12 if p.dtype == torch.float64 else 1e-5
            assert torch.allclose(got, p.detach(), rtol=tol, atol=tol), step
        for r in runs[1:]:
            for a, b in zip(runs[0]["params"][step], r["params"][step]):
                assert torch.equal(bits(a), bits(b)), step
    assert runs[0]["dtypes"] == ["torch.float32", "torch.float64"]
    assert runs[0]["buckets"] >= 3


def test_stats_match_the_reducers(runs):
    names = [n for n, _ in MixedNet().named_parameters()]
    _, tree = adasum.reduce([r["local"][-1] for r in runs], stats=True)
    expected = tree.named(names).summary(batch=4)
    got = runs[0]["stats"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    assert 0.4 < got["adasum/scale"] < 1.1
    assert "adasum/noise/scale" in got and all(f"adasum/noise/layer/{n}/scale" in got for n in names)
    assert all(r["stats"] == got for r in runs[1:])


@pytest.mark.parametrize("name", ["average", "sum"])
def test_baselines_run_through_the_same_hook(runs, name):
    reducer = {"average": adasum.Average(), "sum": adasum.Sum()}[name]
    expected = reducer.reduce([r["baselines"][name]["local"] for r in runs])
    for got, ref in zip(runs[0]["baselines"][name]["reduced"], expected):
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    for r in runs[1:]:
        for a, b in zip(runs[0]["baselines"][name]["reduced"], r["baselines"][name]["reduced"]):
            assert torch.equal(bits(a), bits(b))


def test_one_agreement_round_per_bucket_layout(runs):
    """The hook agrees on a bucket's layout the first time it meets it (DDP's first buckets,
    then the rebuilt ones), not at every backward pass."""
    for r in runs:
        assert r["calls"]["agree"] == r["layouts"] < r["calls"]["hook"], (r["calls"], r["layouts"])


def test_state_pickles_without_its_process_group():
    state = AdasumState(adasum.Adasum(group=object(), algorithm="vhdd"), stats=True)
    state.last_stats = adasum.Stats(())
    copy_ = pickle.loads(pickle.dumps(state))
    assert copy_.reducer.group is None and copy_.reducer.algorithm == "vhdd" and copy_.stats is True
    assert copy_.last_stats is None
    assert not hasattr(state, "__dict__")  # slots


def test_the_hook_refuses_what_is_not_a_bucket():
    with pytest.raises(TypeError, match="python_reducer is not supported"):
        adasum_hook(AdasumState(), (torch.zeros(2), torch.zeros(2)))
