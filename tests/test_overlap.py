"""Delta mode overlapped with backward (DistributedOptimizer(overlap=True)) on real Gloo groups.

One spawn of 3 ranks (a world size that needs the fold) trains, for every scenario, two copies
of the same model from the same start on the same data: one with today's whole-model delta step,
one with ``overlap=True`` and buckets of one parameter each (so that every bucket boundary that
can occur does). With a reduction whose result per layer does not depend on the rest of the
buffer (Adasum's gather on 3 ranks, Sum and Average on 2) the parameters and the optimizer state
must be bit-identical after every update; with VHDD, equal to the float64 rounding of the dot
products.
"""

from __future__ import annotations

import gc

import pytest
import torch

import adasum
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer, Lamb
from conftest import TIMEOUT, raised, same_bits

WORLD = 3
UPDATES = 3
TINY_BUCKETS = 1e-6  # megabytes: every parameter a bucket of its own


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Two parameter groups with different learning rates; ``_foreach`` takes torch's
    multi-tensor implementation, the default on CPU being the per-tensor loop."""
    groups = [{"params": params[:2], "lr": 0.02}, {"params": params[2:]}]
    foreach = name.endswith("_foreach") or None
    if name.startswith("sgd"):
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=foreach)
    if name.startswith("adamw"):
        return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1, foreach=foreach)
    if name.startswith("adam"):
        return torch.optim.Adam(groups, lr=0.01, amsgrad=True, foreach=foreach)
    if name.startswith("lamb"):
        return Lamb(groups, lr=0.05, weight_decay=0.01)
    raise ValueError(name)


def new_model() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A model and its optimizer's parameters: the model's, a frozen one and one no loss uses
    (their buckets are finished in step(), not by a hook)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
    )
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    unused = torch.nn.Parameter(torch.ones(4))
    return model, list(model.parameters()) + [frozen, unused]


def loss_of(model: torch.nn.Module, rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(97 * rank + micro)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def train(rank: int, name: str, passes: int, reducer: adasum.Reducer, overlap: bool, scaled: bool = False) -> dict:
    """UPDATES updates; the parameters after each and the optimizer state at the end."""
    model, params = new_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    opt = DistributedOptimizer(make_optimizer(name, params), reducer, passes, grad_scaler=scaler,
                               overlap=overlap, bucket_cap_mb=TINY_BUCKETS)
    history = []
    for micro in range(UPDATES * passes):
        if name.endswith("closure"):
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = loss_of(model, rank, micro)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            loss = loss_of(model, rank, micro)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                if opt.ready:
                    scaler.step(opt)
                    scaler.update()
        if opt.passes == 0:
            history.append([p.detach().clone() for p in params])
    opt.close()
    # By parameter index: the state is created in the order the parameters are first stepped.
    saved = sorted(opt.state_dict()["state"].items())
    state = [torch.as_tensor(t).reshape(-1).clone() for _, s in saved for _, t in sorted(s.items())]
    return {"params": history, "state": state}


# (optimizer, backward passes per update)
SCENARIOS = [
    ("sgd", 1), ("sgd", 2), ("sgd_foreach", 1), ("adam", 1), ("adam", 3), ("adam_foreach", 2), ("adamw", 1),
    ("adamw", 2), ("lamb", 2), ("sgd_closure", 2),
]


def _mixed(rank: int) -> dict:
    """Rank 1 does not overlap: every rank raises the same error before anything changes (the
    overlapping ranks out of their backward pass)."""
    model, params = new_model()
    opt = DistributedOptimizer(torch.optim.Adam(params, lr=0.01), overlap=rank != 1)
    before = [p.detach().clone() for p in params]

    def update() -> None:
        loss_of(model, rank, 0).backward()
        opt.step()

    return {"error": raised(update), "unchanged": same_bits(before, [p.detach() for p in params]),
            "adam_state": len(opt.state)}


def _all(rank: int, world: int) -> dict:
    gather = adasum.Adasum(algorithm="gather")
    vhdd = adasum.Adasum(algorithm="vhdd")
    return {
        "exact": {(n, k): [train(rank, n, k, gather, overlap) for overlap in (False, True)] for n, k in SCENARIOS},
        "vhdd": [train(rank, "adam", 2, vhdd, overlap) for overlap in (False, True)],
        "scaled": [train(rank, "adamw", 1, gather, overlap, scaled=True) for overlap in (False, True)],
        "mixed": _mixed(rank),
    }


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    # A short group timeout: a rank left waiting fails the tests fast instead of hanging them.
    return spawn(_all, WORLD, timeout=TIMEOUT, group_timeout=20)


@pytest.mark.parametrize("name,passes", SCENARIOS, ids=[f"{n}-x{k}" for n, k in SCENARIOS])
def test_overlap_is_bit_identical_to_the_whole_model_step(runs, name, passes):
    for r in runs:
        whole, overlapped = r["exact"][(name, passes)]
        assert len(overlapped["params"]) == UPDATES
        # The updates moved the parameters, and differently at each update.
        assert not same_bits(overlapped["params"][0], overlapped["params"][-1])
        for step, (a, b) in enumerate(zip(whole["params"], overlapped["params"])):
            assert same_bits(a, b), (name, passes, step)
        assert whole["state"] and same_bits(whole["state"], overlapped["state"])
    for r in runs[1:]:
        assert same_bits(r["exact"][(name, passes)][1]["params"][-1], runs[0]["exact"][(name, passes)][1]["params"][-1])


def _summed(rank: int, world: int) -> dict:
    return {r.name: [train(rank, "adamw", 2, r, overlap) for overlap in (False, True)]
            for r in (adasum.Average(), adasum.Sum())}


@pytest.fixture(scope="module")
def summed() -> list[dict]:
    return spawn(_summed, 2, timeout=TIMEOUT, group_timeout=20)


@pytest.mark.parametrize("name", ["average", "sum"])
def test_overlap_is_bit_identical_with_the_baselines_on_two_ranks(summed, name):
    # Each element is a + b on two ranks, whichever bucket carries it.
    for r in summed:
        whole, overlapped = r[name]
        assert all(same_bits(a, b) for a, b in zip(whole["params"], overlapped["params"]))
        assert same_bits(whole["state"], overlapped["state"])


def test_overlap_with_vhdd_agrees_to_the_rounding_of_the_dot_products(runs):
    for r in runs:
        whole, overlapped = r["vhdd"]
        for a, b in zip(whole["params"], overlapped["params"]):
            for x, y in zip(a, b):
                assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)
    assert all(same_bits(r["vhdd"][1]["params"][-1], runs[0]["vhdd"][1]["params"][-1]) for r in runs)


def test_grad_scaler_takes_whole_model_steps(runs):
    for r in runs:
        whole, overlapped = r["scaled"]
        assert all(same_bits(a, b) for a, b in zip(whole["params"], overlapped["params"]))
        assert same_bits(whole["state"], overlapped["state"])


def test_overlap_is_agreed_before_anything_changes(runs):
    for r in runs:
        assert r["mixed"] == {"error": "ValueError: adasum: overlap=False on rank 1 but overlap=True on rank 0",
                              "unchanged": True, "adam_state": 0}


def test_overlap_refuses_what_it_cannot_do_exactly():
    params = [torch.nn.Parameter(torch.ones(3))]

    class Clipped(torch.optim.SGD):
        pass

    for opt, kwargs, message in [
        (torch.optim.RMSprop(params), {}, "RMSprop may look across parameters"),
        (Clipped(params, lr=0.1), {}, "Clipped may look across parameters"),
        (torch.optim.Adam(params), {"stats": True}, "overlap=True does not record stats"),
        (torch.optim.Adam(params), {"bucket_cap_mb": 0}, "bucket_cap_mb must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            DistributedOptimizer(opt, overlap=True, **kwargs)


def test_a_dropped_optimizer_leaves_inert_hooks():
    # A live hook would start an update at this backward pass, and fail: no process group here.
    model = torch.nn.Linear(3, 2)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), overlap=True)
    del opt
    gc.collect()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(4, 3)).sum().backward()
    assert same_bits(before, [p.detach() for p in model.parameters()])
    assert model.weight.grad is not None


def test_an_undeclared_scaler_before_the_last_pass_changes_nothing():
    # The first of two passes: no gradient is final, no bucket stepped, nothing sent.
    model = torch.nn.Linear(3, 2)
    scaler = torch.amp.GradScaler("cpu")
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), backward_passes_per_step=2,
                               overlap=True)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(4, 3)).sum()).backward()
    with pytest.raises(RuntimeError, match="stepped by a GradScaler it does not know"):
        scaler.step(opt)
    assert same_bits(before, [p.detach() for p in model.parameters()]) and not opt.state
