"""Local SGD and DiLoCo (LocalSGD) on real Gloo groups, against an independent replay.

One spawn of 3 ranks (a world size that needs the fold) runs every scenario; each rank returns
its parameters after every update. The parent replays each scenario in one process: every
worker a model and an optimizer of its own, stepped H times on that worker's data, the deltas
from the last synchronised parameters reduced by the reducer's ``reduce``, then the outer step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import adasum
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer, LocalSGD, broadcast_parameters
from conftest import TIMEOUT, caught, raised, same_bits

WORLD = 3


def new_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def loss_of(model: torch.nn.Module, rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(97 * rank + micro)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def make_inner(name: str, ps: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Two parameter groups with different learning rates: the first layer and the rest."""
    groups = [{"params": ps[:2], "lr": 0.02}, {"params": ps[2:]}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.01)
    return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)


def make_outer(ps: list[torch.Tensor], lr: float = 0.7) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True)


REDUCERS = {"adasum": adasum.Adasum, "average": adasum.Average}

# name: (inner, H, outer?, reducer, backward passes per update, updates, wire dtype)
SCENARIOS = {
    "local-sgd": ("sgd", 4, False, "adasum", 1, 8, None),
    "diloco": ("adamw", 3, True, "adasum", 1, 9, None),
    "diloco-average-x2-closure": ("adamw", 2, True, "average", 2, 4, None),
    "diloco-bf16": ("adam", 2, True, "adasum", 1, 4, torch.bfloat16),
    "local-adam-grad-scaler": ("adam", 3, False, "adasum", 1, 6, None),
}
#: (update, rank) whose loss overflows in the GradScaler scenario: in the middle of a cycle and
#: at its last update.
OVERFLOWS = frozenset({(1, 1), (2, 2)})


def _train(rank: int, name: str) -> dict:
    inner, h, outer, reducer, passes, updates, wire = SCENARIOS[name]
    model = new_model(rank)  # different initialisations: broadcast_parameters makes them equal
    broadcast_parameters(model)
    ps = list(model.parameters())
    opt = LocalSGD(make_inner(inner, ps), REDUCERS[reducer](), sync_every=h, backward_passes_per_step=passes,
                   outer=make_outer(ps) if outer else None, stats=True, named_parameters=model.named_parameters(),
                   wire_dtype=wire)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if "scaler" in name else None
    out = {"initial": params(model), "params": [], "inner_steps": [], "scales": []}
    for micro in range(updates * passes):
        if "closure" in name:  # a closure per backward pass: the last one reaches the optimizer
            def closure(micro=micro):
                opt.zero_grad()  # nothing in the middle of an accumulation
                loss = loss_of(model, rank, micro)
                loss.backward()
                return loss

            assert torch.isfinite(opt.step(closure))
        elif scaler is None:
            opt.zero_grad()
            loss_of(model, rank, micro).backward()
            opt.step()
        else:  # this rank's own scaler; LocalSGD unscales
            opt.zero_grad()
            scaler.scale(loss_of(model, rank, micro) * (torch.inf if (micro, rank) in OVERFLOWS else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
            out["scales"].append(scaler.get_scale())
        if opt.passes == 0:
            out["params"].append(params(model))
            out["inner_steps"].append(opt.inner_steps)
    out["stats"] = opt.last_stats.summary()
    return out


def _h1_is_delta_mode(rank: int, passes: int) -> dict:
    """The same run through DistributedOptimizer and LocalSGD(sync_every=1)."""
    out = {}
    for kind in ("delta", "local"):
        model = new_model(0)
        inner = make_inner("adam", list(model.parameters()))
        opt = (DistributedOptimizer(inner, backward_passes_per_step=passes) if kind == "delta"
               else LocalSGD(inner, sync_every=1, backward_passes_per_step=passes))
        out[kind] = []
        for micro in range(3 * passes):
            opt.zero_grad()
            loss_of(model, rank, micro).backward()
            opt.step()
            out[kind].append(params(model))
    return out


def _resume(rank: int) -> dict:
    """DiLoCo with H=3 checkpointed after 4 updates (one into a cycle) and resumed in a fresh
    model and optimizer, against the uninterrupted run."""
    def build(seed: int) -> tuple[torch.nn.Module, LocalSGD]:
        model = new_model(seed)
        ps = list(model.parameters())
        return model, LocalSGD(make_inner("adamw", ps), sync_every=3, outer=make_outer(ps))

    def train(model: torch.nn.Module, opt: LocalSGD, first: int, last: int) -> None:
        for micro in range(first, last):
            opt.zero_grad()
            loss_of(model, rank, micro).backward()
            opt.step()

    model, opt = build(0)
    train(model, opt, 0, 4)
    # deepcopy stands for a checkpoint file: the inner state_dict shares live tensors.
    saved_params, saved_state = params(model), copy.deepcopy(opt.state_dict())
    train(model, opt, 4, 9)
    resumed, opt2 = build(1)
    with torch.no_grad():
        for p, s in zip(resumed.parameters(), saved_params):
            p.copy_(s)
    opt2.load_state_dict(saved_state)
    train(resumed, opt2, 4, 9)
    return {"continued": params(model), "resumed": params(resumed), "saved_steps": saved_state["inner_steps"]}


def _elastic(rank: int) -> dict:
    """The "diloco" scenario on ranks 0 and 1 for 4 updates (one into the second cycle),
    checkpointed; then all three ranks resume from the checkpoint, rank 2 from rank 0's files
    (new rank r takes old rank r mod N's, the rule of elastic runs), for the remaining 5."""
    pair = dist.new_group([0, 1])
    _, h, _, _, _, updates, _ = SCENARIOS["diloco"]

    def build(reducer: adasum.Reducer) -> tuple[torch.nn.Module, LocalSGD]:
        model = new_model(0)
        ps = list(model.parameters())
        return model, LocalSGD(make_inner("adamw", ps), reducer, sync_every=h, outer=make_outer(ps))

    def train(model: torch.nn.Module, opt: LocalSGD, micros: range) -> list:
        out = []
        for micro in micros:
            opt.zero_grad()
            loss_of(model, rank, micro).backward()
            opt.step()
            out.append(params(model))
        return out

    checkpoint = None
    if rank < 2:
        model, opt = build(adasum.Adasum(pair))
        train(model, opt, range(4))
        checkpoint = (params(model), copy.deepcopy(opt.state_dict()))
    checkpoints = [None] * WORLD
    dist.all_gather_object(checkpoints, checkpoint)
    saved_params, saved_state = checkpoints[rank % 2]
    model, opt = build(adasum.Adasum())
    with torch.no_grad():
        for p, saved in zip(model.parameters(), saved_params):
            p.copy_(saved)
    opt.load_state_dict(saved_state)
    return {"initial": params(new_model(0)), "params": train(model, opt, range(4, updates))}


def _agreements(rank: int) -> int:
    """Agreement rounds in 8 updates with H=4: one per cycle, none between synchronisations."""
    import adasum._reducer

    counted = {"rounds": 0}
    agree = adasum._reducer.agree

    def counting(*args, **kwargs):
        counted["rounds"] += 1
        return agree(*args, **kwargs)

    adasum._reducer.agree = counting
    try:
        model = new_model(0)
        opt = LocalSGD(make_inner("sgd", list(model.parameters())), sync_every=4)
        for micro in range(8):
            opt.zero_grad()
            loss_of(model, rank, micro).backward()
            opt.step()
    finally:
        adasum._reducer.agree = agree
    return counted["rounds"]


def _mismatch(rank: int, case: str) -> dict:
    """One rank differs: every rank raises the same error at the first update, before any
    parameter or optimizer state changes."""
    model = new_model(0)
    ps = list(model.parameters())
    h = 3 if case == "sync_every" and rank == 1 else 4
    wire = torch.bfloat16 if case == "wire_dtype" and rank == 2 else None
    outer = None if case == "no_outer" and rank == 0 else make_outer(
        ps[:2] if case == "outer_params" and rank == 2 else ps, lr=0.5 if case == "outer_lr" and rank == 2 else 0.7)
    opt = LocalSGD(make_inner("adam", ps), sync_every=h, outer=outer, wire_dtype=wire)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = params(model)

    def first_update() -> None:
        loss = loss_of(model, rank, 0)
        if case == "grad_scaler" and rank == 1:
            scaler.scale(loss).backward()
            scaler.step(opt)
        else:
            loss.backward()
            opt.step()

    return {"error": raised(first_update), "unchanged": same_bits(before, params(model)),
            "inner_state": len(opt.state), "outer_state": 0 if outer is None else len(outer.state)}


MISMATCHES = {
    "sync_every": "ValueError: adasum: sync_every=3 on rank 1 but sync_every=4 on rank 0",
    "outer_lr": "ValueError: adasum: outer[0].lr=0.5 on rank 2 but outer[0].lr=0.7 on rank 0",
    "no_outer": "ValueError: adasum: outer=SGD with 1 groups on rank 1 but outer=None on rank 0",
    "outer_params": "ValueError: adasum: rank 2: the outer optimizer holds 0 parameters the inner one does not "
                    "and misses 2 of its; give it the same parameters",
    "wire_dtype": "ValueError: adasum: tensor 0 is (8, 5) bfloat16 on rank 2 but (8, 5) float32 on rank 0",
    "grad_scaler": "ValueError: adasum: stepped_by_grad_scaler=True on rank 1 but stepped_by_grad_scaler=False "
                   "on rank 0",
}


def _all(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    return {
        "scenarios": {name: _train(rank, name) for name in SCENARIOS},
        "h1": {passes: _h1_is_delta_mode(rank, passes) for passes in (1, 2)},
        "resume": _resume(rank),
        "elastic": _elastic(rank),
        "agreements": _agreements(rank),
        "mismatch": {case: _mismatch(rank, case) for case in MISMATCHES},
    }


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    # A short group timeout: a rank left waiting fails the tests fast instead of hanging them.
    return spawn(_all, WORLD, timeout=TIMEOUT, group_timeout=20)


def replay(name: str, initial: list[torch.Tensor], world: int = WORLD,
           resize: tuple[int, int] | None = None) -> tuple[list[list[list[torch.Tensor]]], list]:
    """LocalSGD written out in one process: ``history[step][rank]`` is worker rank's parameters
    after each update; also the deltas of the last synchronisation. A worker whose loss
    overflowed (``OVERFLOWS``, with a GradScaler) skips that update. ``resize=(update, n)``:
    from that update on there are n workers, new worker r a copy of worker r mod world (its
    parameters and its inner optimizer)."""
    skipped = OVERFLOWS if "scaler" in name else frozenset()
    inner, h, outer, reducer, passes, updates, wire = SCENARIOS[name]
    x = [t.clone() for t in initial]
    workers = []
    for _ in range(world):
        model = new_model(0)
        with torch.no_grad():
            for p, t in zip(model.parameters(), x):
                p.copy_(t)
        workers.append((model, make_inner(inner, list(model.parameters()))))
    shadow = [torch.nn.Parameter(t.clone()) for t in x]  # what the outer optimizer steps
    outer_opt = make_outer(shadow) if outer else None
    history, deltas = [], None
    for step in range(updates):
        if resize is not None and step == resize[0]:
            workers += [copy.deepcopy(workers[r % world]) for r in range(world, resize[1])]
        for rank, (model, opt) in enumerate(workers):
            opt.zero_grad()
            for k in range(passes):
                loss_of(model, rank, step * passes + k).backward()
            if (step, rank) not in skipped:
                opt.step()
        if (step + 1) % h == 0:
            deltas = [[(p.detach() - xi).to(wire or xi.dtype) for p, xi in zip(model.parameters(), x)]
                      for model, _ in workers]
            combined = [c.to(xi.dtype) for c, xi in zip(REDUCERS[reducer]().reduce(deltas), x)]
            if outer_opt is None:
                x = [xi + d for xi, d in zip(x, combined)]
            else:
                with torch.no_grad():
                    for p, xi, d in zip(shadow, x, combined):
                        p.copy_(xi)
                        p.grad = -d
                outer_opt.step()
                x = [p.detach().clone() for p in shadow]
            for model, _ in workers:
                with torch.no_grad():
                    for p, xi in zip(model.parameters(), x):
                        p.copy_(xi)
        history.append([params(model) for model, _ in workers])
    return history, deltas


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_local_sgd_equals_a_single_process_replay(runs, name):
    h, updates = SCENARIOS[name][1], SCENARIOS[name][5]
    scenario = [r["scenarios"][name] for r in runs]
    assert scenario[0]["inner_steps"] == [(s + 1) % h for s in range(updates)]
    expected, _ = replay(name, scenario[0]["initial"])
    for step in range(updates):
        for rank, r in enumerate(scenario):
            for got, want in zip(r["params"][step], expected[step][rank]):
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (name, step, rank, (got - want).abs().max())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replicas_are_bit_identical_after_each_synchronisation_only(runs, name):
    h = SCENARIOS[name][1]
    scenario = [r["scenarios"][name] for r in runs]
    for step, mine in enumerate(scenario[0]["params"]):
        synced = (step + 1) % h == 0
        for other in scenario[1:]:
            # Between synchronisations each rank has moved on its own data.
            assert same_bits(mine, other["params"][step]) == synced, (name, step)


def test_grad_scalers_are_per_rank_and_an_overflow_skips_one_ranks_update(runs):
    scales = [r["scenarios"]["local-adam-grad-scaler"]["scales"] for r in runs]
    # Growth every 2 clean updates; rank 1 backed off at update 1, rank 2 at update 2 (the sync).
    assert scales[0][:3] == [2.0**10, 2.0**11, 2.0**11]
    assert scales[1][:3] == [2.0**10, 2.0**9, 2.0**9]
    assert scales[2][:3] == [2.0**10, 2.0**11, 2.0**10]
    # What the replay checks: the overflowed updates were skipped on those ranks alone.
    scenario = [r["scenarios"]["local-adam-grad-scaler"] for r in runs]
    assert same_bits(scenario[1]["params"][1], scenario[1]["params"][0])


def test_stats_are_those_of_the_last_synchronisations_deltas(runs):
    got = runs[0]["scenarios"]["diloco"]["stats"]
    _, deltas = replay("diloco", runs[0]["scenarios"]["diloco"]["initial"])
    _, tree = adasum.reduce(deltas, stats=True)
    assert "adasum/layer/0.weight/cos" in got
    for key, value in tree.named(["0.weight", "0.bias", "2.weight", "2.bias"]).summary().items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("passes", [1, 2])
def test_sync_every_1_is_delta_mode_bit_for_bit(runs, passes):
    for r in runs:
        h1 = r["h1"][passes]
        assert len(h1["local"]) == 3 * passes and not same_bits(h1["local"][-1], h1["local"][0])
        for delta, local in zip(h1["delta"], h1["local"]):
            assert same_bits(delta, local)


def test_resume_equals_an_uninterrupted_run(runs):
    for r in runs:
        assert r["resume"]["saved_steps"] == 1
        assert same_bits(r["resume"]["continued"], r["resume"]["resumed"])


def test_resume_on_more_ranks_follows_the_elastic_rule(runs):
    expected, _ = replay("diloco", runs[0]["elastic"]["initial"], world=2, resize=(4, WORLD))
    for step, want in enumerate(expected[4:], start=4):
        for rank, r in enumerate(runs):
            for got, w in zip(r["elastic"]["params"][step - 4], want[rank]):
                assert torch.allclose(got, w, rtol=1e-5, atol=1e-6), (step, rank, (got - w).abs().max())
    assert same_bits(runs[0]["elastic"]["params"][-1], runs[2]["elastic"]["params"][-1])


def test_one_agreement_round_per_cycle(runs):
    assert [r["agreements"] for r in runs] == [2] * WORLD


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatch_raises_everywhere_before_anything_changes(runs, case):
    for r in runs:
        assert r["mismatch"][case] == {"error": MISMATCHES[case], "unchanged": True, "inner_state": 0,
                                       "outer_state": 0}


def test_rejects_bad_arguments():
    model = new_model(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    for h in (0, 2.0, True):
        assert caught(lambda: LocalSGD(inner, sync_every=h)) == f"ValueError: sync_every must be an integer >= 1, got {h!r}"
    assert caught(lambda: LocalSGD(inner, sync_every=2, outer=inner)) == (
        "ValueError: outer must be an optimizer of its own, not the inner optimizer")
    assert caught(lambda: LocalSGD(inner, sync_every=2, wire_dtype=torch.int8)) == (
        "ValueError: wire_dtype must be None or a floating dtype the reducers take, got torch.int8")
    assert caught(lambda: LocalSGD(inner, sync_every=2, outer="sgd")) == (
        "TypeError: outer must be a plain torch.optim.Optimizer, got str")
    opt = LocalSGD(inner, sync_every=2, outer=torch.optim.SGD(model.parameters(), lr=1.0))
    state = opt.state_dict()
    assert caught(lambda: opt.load_state_dict({**state, "inner_steps": 2})) == (
        "ValueError: the checkpoint is 2 updates into a cycle; sync_every is 2")
    assert caught(lambda: opt.load_state_dict({**state, "outer": None})) == (
        "ValueError: the checkpoint and this LocalSGD differ in having an outer optimizer")
    assert caught(lambda: opt.load_state_dict({**state, "inner_steps": 1, "start": params(model)[:1]})) == (
        "ValueError: the checkpoint's synchronised parameters do not match this optimizer's parameters")
    opt.load_state_dict({**state, "inner_steps": 1, "start": params(model)})
    assert opt.inner_steps == 1
    with pytest.raises(RuntimeError, match="add_param_group 1 updates into a cycle"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
