"""Delta mode (DistributedOptimizer) on real Gloo groups, and LAMB against its formulas.

One spawn of 3 ranks (a world size that needs the fold) runs every scenario; each rank returns
its accumulated local gradients and its parameters after every update. The parent replays each
run independently: per rank a plain optimizer steps from the common parameters on that rank's
gradients, the deltas go through ``adasum.reduce``, and the parameters move by the result.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adasum
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer, Lamb, broadcast_parameters, rank_state
from conftest import TIMEOUT, bits, caught, raised

WORLD = 3
STEPS = 3


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Two parameter groups with different learning rates: the first layer and the rest."""
    groups = [{"params": params[:2], "lr": 0.02}, {"params": params[2:]}]
    if name.startswith("sgd"):
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    if name.startswith("adamw"):
        return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)
    if name.startswith("adam"):
        return torch.optim.Adam(groups, lr=0.01)
    if name.startswith("lamb"):
        return Lamb(groups, lr=0.05, weight_decay=0.01)
    raise ValueError(name)


# (optimizer, backward passes per step)
SCENARIOS = [
    ("sgd", 1), ("sgd", 2), ("adam", 1), ("adam", 3), ("adamw", 1), ("adamw", 2),
    ("lamb", 1), ("lamb", 2), ("sgd_closure", 2), ("adam_bf16_autocast", 1),
]


def new_model(rank: int) -> torch.nn.Module:
    # Different initialisations per rank: broadcast_parameters must make them equal.
    torch.manual_seed(rank)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def loss_of(model: torch.nn.Module, rank: int, micro: int, autocast: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(97 * rank + micro)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    return torch.nn.functional.mse_loss(out.float(), y)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _run_scenario(rank: int, name: str, passes: int) -> dict:
    model = new_model(rank)
    broadcast_parameters(model)
    opt = DistributedOptimizer(
        make_optimizer(name, list(model.parameters())), backward_passes_per_step=passes,
        stats=name == "adam", named_parameters=model.named_parameters(),
    )
    out = {"initial": params(model), "grads": [], "params": []}
    for micro in range(STEPS * passes):
        if name.endswith("closure"):
            def closure():
                opt.zero_grad()
                loss = loss_of(model, rank, micro)
                loss.backward()
                return loss

            assert torch.isfinite(opt.step(closure))
        else:
            opt.zero_grad()
            loss_of(model, rank, micro, autocast=name.endswith("autocast")).backward()
            assert opt.ready == ((micro + 1) % passes == 0)
            opt.step()
        if opt.passes == 0:  # an update happened: the gradients are still there
            out["grads"].append(grads(model))
            out["params"].append(params(model))
    out["stats"] = opt.last_stats.summary() if opt.last_stats is not None else {}
    return out


def _state_dict_round_trip(rank: int) -> dict:
    model = new_model(0)
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01))

    def train(m: torch.nn.Module, o: DistributedOptimizer, first: int) -> None:
        for micro in range(first, first + 2):
            o.zero_grad()
            loss_of(m, rank, micro).backward()
            o.step()

    train(model, opt, 0)
    # deepcopy stands for a checkpoint file: state_dict() shares the live step tensors.
    saved_params, saved_state = params(model), copy.deepcopy(opt.state_dict())
    train(model, opt, 2)
    resumed = new_model(1)
    with torch.no_grad():
        for p, s in zip(resumed.parameters(), saved_params):
            p.copy_(s)
    opt2 = DistributedOptimizer(torch.optim.Adam(resumed.parameters(), lr=0.01))
    opt2.load_state_dict(saved_state)
    train(resumed, opt2, 2)
    return {"continued": params(model), "resumed": params(resumed),
            "steps": int(opt.state_dict()["state"][0]["step"])}


def _states_across_worlds(rank: int) -> dict:
    """One Adam step (each rank its own moments); rank 0 gathers every rank's state; then every
    rank loads from a list of 2 old ranks' states, as on resuming a world of 2."""
    model = new_model(0)
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01))
    opt.zero_grad()
    loss_of(model, rank, 0).backward()
    opt.step()
    own = copy.deepcopy(opt.state_dict())
    gathered = opt.gather_state_dicts()
    marked = [copy.deepcopy(own) for _ in range(2)]
    for old, state in enumerate(marked):
        state["state"][0]["exp_avg"].fill_(old)
    opt.load_state_dicts(marked)
    return {"own": own, "gathered": gathered, "loaded": opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]}


def _grad_scaler(rank: int, overflow_step: int) -> dict:
    model = new_model(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    opt = DistributedOptimizer(make_optimizer("adam", list(model.parameters())), grad_scaler=scaler)
    out = {"initial": params(model), "grads": [], "params": [], "scales": []}
    for step in range(5):
        opt.zero_grad()
        loss = loss_of(model, rank, step)
        if step == overflow_step and rank == 1:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        if step != 4:  # the last step leaves unscaling to scaler.step
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        scaler.step(opt)
        scaler.update()
        out["grads"].append(grads(model))  # unscaled (and clipped) in place
        out["params"].append(params(model))
        out["scales"].append(float(scaler.get_scale()))
    # Without grad_scaler=, a scaler-driven step must refuse rather than let scalers diverge.
    bare = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    bare.zero_grad()
    scaler.scale(loss_of(model, rank, 9)).backward()
    try:
        scaler.step(bare)
        out["unknown_scaler"] = None
    except RuntimeError as e:
        out["unknown_scaler"] = str(e)
    return out


def _baselines(rank: int) -> dict:
    """One SGD step through the wrapper with each baseline reducer: the deltas are -lr * grad."""
    out = {}
    for reducer in (adasum.Average(), adasum.Sum()):
        model = new_model(0)
        loss_of(model, rank, 0).backward()
        out[reducer.name] = {"initial": params(model), "grads": grads(model)}
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), reducer).step()
        out[reducer.name]["params"] = params(model)
    return out


def _mismatch(rank: int) -> dict:
    """Rank 1 has one parameter more: every rank raises before its local step."""
    model = new_model(0)
    extra = [torch.nn.Parameter(torch.ones(3))] if rank == 1 else []
    opt = DistributedOptimizer(torch.optim.Adam(list(model.parameters()) + extra, lr=0.01))
    loss_of(model, rank, 0).backward()
    before = params(model)
    error = caught(opt.step)
    return {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, params(model))),
            "adam_state": len(opt.state)}


def _agreements_per_step(rank: int) -> int:
    """Agreement rounds in three steps of the wrapper (the check before the local step is the
    only one: the reduction that follows skips its own)."""
    import adasum._reducer
    import adasum.optim._distributed

    counted = {"rounds": 0}
    agree = adasum._reducer.agree

    def counting(*args, **kwargs):
        counted["rounds"] += 1
        return agree(*args, **kwargs)

    adasum._reducer.agree = adasum.optim._distributed.agree = counting
    try:
        model = new_model(0)
        opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01))
        for step in range(3):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
    finally:
        adasum._reducer.agree = adasum.optim._distributed.agree = agree
    return counted["rounds"] / 3


def _options_differ(rank: int, case: str) -> dict:
    """One rank's options change the step's protocol: every rank raises the same error before
    anything changes. ``grad_scaler``: only rank 0 passes its scaler; ``scaler_step``: rank 2
    steps directly, the others through their scalers; ``passes``, ``passes_scaled``: rank 1
    accumulates two passes, without and with a scaler."""
    model = new_model(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = case != "passes"
    passes = 2 if case.startswith("passes") and rank == 1 else 1
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), backward_passes_per_step=passes,
                               grad_scaler=scaler if scaled and (case != "grad_scaler" or rank == 0) else None)
    before = params(model)

    def steps() -> None:
        for micro in range(passes):
            opt.zero_grad()
            loss = loss_of(model, rank, micro)
            if not scaled or (case == "scaler_step" and rank == 2):
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)

    return {"error": raised(steps), "unchanged": all(torch.equal(a, b) for a, b in zip(before, params(model))),
            "adam_state": len(opt.state), "scale": scaler.get_scale()}


def _broadcasts(rank: int) -> dict:
    """broadcast_parameters agrees on shapes and dtypes first; integer buffers travel too."""
    out = {}
    for case, shape, dtype in [("shape", (12, 7), torch.float32), ("dtype", (10, 7), torch.float64)]:
        mine = torch.full(shape if rank == 1 else (10, 7), float(rank), dtype=dtype if rank == 1 else torch.float32)
        out[case] = {"error": raised(lambda: broadcast_parameters([mine])), "unchanged": bool((mine == rank).all())}
    norm = torch.nn.BatchNorm1d(3)
    norm.num_batches_tracked.fill_(rank + 5)
    broadcast_parameters(norm, src=2)
    out["buffers"] = int(norm.num_batches_tracked)
    return out


def _all(rank: int, world: int) -> dict:
    torch.manual_seed(1234)
    return {
        "scenarios": {(n, k): _run_scenario(rank, n, k) for n, k in SCENARIOS},
        "round_trip": _state_dict_round_trip(rank),
        "across_worlds": _states_across_worlds(rank),
        "scaler": _grad_scaler(rank, overflow_step=2),
        "baselines": _baselines(rank),
        "mismatch": _mismatch(rank),
        "agreements": _agreements_per_step(rank),
        "options": {case: _options_differ(rank, case) for case in OPTION_ERRORS},
        "broadcasts": _broadcasts(rank),
    }


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    # A short group timeout: a rank left waiting fails the tests fast instead of hanging them.
    return spawn(_all, WORLD, timeout=TIMEOUT, group_timeout=20)


def replay(name: str, initial: list[torch.Tensor], per_rank_grads: list[list[list[torch.Tensor]]],
           skipped: frozenset[int] = frozenset()) -> tuple[list[list[torch.Tensor]], list]:
    """Delta mode written out: local optimizers, deltas, adasum.reduce, common update."""
    x = [t.clone() for t in initial]
    local = []
    for _ in per_rank_grads:
        ps = [torch.nn.Parameter(t.clone()) for t in initial]
        local.append((ps, make_optimizer(name, ps)))
    history, deltas_seen = [], []
    for step in range(len(per_rank_grads[0])):
        if step not in skipped:
            deltas = []
            for (ps, opt), rank_grads in zip(local, per_rank_grads):
                with torch.no_grad():
                    for p, xi, g in zip(ps, x, rank_grads[step]):
                        p.copy_(xi)
                        p.grad = g.clone()
                opt.step()
                deltas.append([p.detach() - xi for p, xi in zip(ps, x)])
            combined = adasum.reduce(deltas)
            x = [xi + c for xi, c in zip(x, combined)]
            deltas_seen.append(deltas)
        history.append([t.clone() for t in x])
    return history, deltas_seen


def assert_runs_match(runs: list[dict], name: str, skipped: frozenset[int] = frozenset()) -> list:
    for r in runs[1:]:
        for step_a, step_b in zip(runs[0]["params"], r["params"]):
            assert all(torch.equal(bits(a), bits(b)) for a, b in zip(step_a, step_b))
    expected, deltas = replay(name, runs[0]["initial"], [r["grads"] for r in runs], skipped)
    assert len(expected) == len(runs[0]["params"])
    for step, (want, got) in enumerate(zip(expected, runs[0]["params"])):
        for w, g in zip(want, got):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), (name, step, (g - w).abs().max())
    return deltas


@pytest.mark.parametrize("name,passes", SCENARIOS, ids=[f"{n}-x{k}" for n, k in SCENARIOS])
def test_delta_mode_equals_local_steps_then_reduce(runs, name, passes):
    scenario = [r["scenarios"][(name, passes)] for r in runs]
    assert len(scenario[0]["params"]) == STEPS
    # The ranks saw different data, so the updates moved the parameters away from the start.
    assert not torch.equal(scenario[0]["params"][-1][0], scenario[0]["initial"][0])
    assert_runs_match(scenario, name.split("_")[0])


def test_accumulation_sums_the_passes(runs):
    # The gradients of the x3 run's first update are the sum of three passes' gradients.
    single = [r["scenarios"][("adam", 1)] for r in runs]
    triple = [r["scenarios"][("adam", 3)] for r in runs]
    assert torch.equal(single[0]["initial"][0], triple[0]["initial"][0])
    model = new_model(0)
    with torch.no_grad():
        for p, t in zip(model.parameters(), triple[0]["initial"]):
            p.copy_(t)
    for micro in range(3):
        loss_of(model, 2, micro).backward()
    for got, want in zip(triple[2]["grads"][0], grads(model)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_stats_of_the_deltas(runs):
    scenario = [r["scenarios"][("adam", 1)] for r in runs]
    _, deltas = replay("adam", scenario[0]["initial"], [r["grads"] for r in scenario])
    _, tree = adasum.reduce(deltas[-1], stats=True)
    got = scenario[0]["stats"]
    assert "adasum/layer/0.weight/cos" in got and "adasum/level1/scale" in got
    for key, value in tree.named(["0.weight", "0.bias", "2.weight", "2.bias"]).summary().items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("name", ["average", "sum"])
def test_baselines_run_through_the_same_wrapper(runs, name):
    reducer = {"average": adasum.Average(), "sum": adasum.Sum()}[name]
    moved = reducer.reduce([[-0.5 * g for g in r["baselines"][name]["grads"]] for r in runs])
    for r in runs:
        for got, start, step in zip(r["baselines"][name]["params"], r["baselines"][name]["initial"], moved):
            assert torch.allclose(got, start + step, rtol=1e-6, atol=1e-7)


def test_a_parameter_mismatch_raises_everywhere_before_the_step(runs):
    for r in runs:
        assert r["mismatch"]["error"] == "ValueError: adasum: rank 1 passed 5 tensors, rank 0 passed 4"
        assert r["mismatch"]["unchanged"] and r["mismatch"]["adam_state"] == 0


def test_one_agreement_round_per_step(runs):
    assert [r["agreements"] for r in runs] == [1.0] * len(runs)


OPTION_ERRORS = {
    "grad_scaler": "RuntimeError: adasum: rank 1: DistributedOptimizer is stepped by a GradScaler it does not know: "
                   "pass grad_scaler=scaler to DistributedOptimizer, so that an overflow on one rank makes every "
                   "rank's scaler back off and the scalers stay identical",
    "scaler_step": "ValueError: adasum: stepped_by_grad_scaler=False on rank 2 but stepped_by_grad_scaler=True on rank 0",
    "passes": "ValueError: adasum: backward_passes_per_step=2 on rank 1 but backward_passes_per_step=1 on rank 0",
    "passes_scaled": "RuntimeError: adasum: rank 1: GradScaler.step was called after 1 of 2 backward passes; with "
                     "accumulation, call scaler.unscale_/step/update only when DistributedOptimizer.ready is True",
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_options_that_change_the_protocol_are_agreed_before_the_step(runs, case):
    for r in runs:
        assert r["options"][case] == {"error": OPTION_ERRORS[case], "unchanged": True, "adam_state": 0,
                                      "scale": 2.0**10}


@pytest.mark.parametrize("case,message", [
    ("shape", "ValueError: adasum: tensor 0 is (12, 7) float32 on rank 1 but (10, 7) float32 on rank 0"),
    ("dtype", "ValueError: adasum: tensor 0 is (10, 7) float64 on rank 1 but (10, 7) float32 on rank 0"),
])
def test_broadcast_parameters_refuses_different_tensors_on_every_rank(runs, case, message):
    for r in runs:
        assert r["broadcasts"][case] == {"error": message, "unchanged": True}


def test_broadcast_parameters_carries_integer_buffers(runs):
    assert [r["broadcasts"]["buffers"] for r in runs] == [7] * WORLD


def test_state_dict_round_trip(runs):
    for r in runs:
        rt = r["round_trip"]
        assert rt["steps"] == 4
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(rt["continued"], rt["resumed"]))


def test_every_rank_state_is_gathered_and_mapped_by_rank_mod_n(runs):
    gathered = runs[0]["across_worlds"]["gathered"]
    assert all(r["across_worlds"]["gathered"] is None for r in runs[1:])
    assert len(gathered) == WORLD
    for rank, r in enumerate(runs):
        own = r["across_worlds"]["own"]["state"][0]
        assert torch.equal(gathered[rank]["state"][0]["exp_avg"], own["exp_avg"])
        assert int(gathered[rank]["state"][0]["step"]) == 1
        assert torch.all(r["across_worlds"]["loaded"] == rank % 2)
    # The ranks' moments are their own: rank 1's differ from rank 0's.
    assert not torch.equal(gathered[0]["state"][0]["exp_avg"], gathered[1]["state"][0]["exp_avg"])


def test_rank_state_rule():
    states = ["a", "b", "c"]
    assert [rank_state(states, r) for r in range(5)] == ["a", "b", "c", "a", "b"]
    assert caught(lambda: rank_state([], 0)) == "ValueError: no saved states to resume from"
    assert caught(lambda: rank_state(states, -1)) == "ValueError: rank must be >= 0, got -1"


def test_grad_scaler_overflow_on_one_rank_skips_everywhere(runs):
    scaler = [r["scaler"] for r in runs]
    # Identical scalers: the overflow on rank 1 at step 2 halved every rank's scale.
    for r in scaler[1:]:
        assert r["scales"] == scaler[0]["scales"]
    scales = scaler[0]["scales"]
    assert scales[2] == scales[1] / 2
    assert scales[1] == 2.0 * 2.0**10  # grew after two clean steps
    # Step 2 changed nothing anywhere, though ranks 0 and 2 had finite gradients.
    assert all(torch.isfinite(g).all() for g in scaler[0]["grads"][2])
    for r in scaler:
        assert all(torch.equal(a, b) for a, b in zip(r["params"][2], r["params"][1]))
    assert_runs_match(scaler, "adam", skipped=frozenset({2}))
    assert "grad_scaler=scaler" in scaler[0]["unknown_scaler"]


# ----------------------------------------------------------------------------- Lamb, locally


def lamb_by_hand(x, g, m, v, t, lr, b1, b2, eps, wd, bias_correction=True, clip=None):
    """One LAMB update (You et al. 2019, Alg. 2) in float64, written out element by element."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh = m / (1 - b1**t) if bias_correction else m
    vh = v / (1 - b2**t) if bias_correction else v
    r = mh / (vh.sqrt() + eps)
    u = r + wd * x
    xn = math.sqrt(float((x * x).sum()))
    un = math.sqrt(float((u * u).sum()))
    phi = min(xn, clip) if clip is not None else xn
    ratio = phi / un if xn > 0 and un > 0 else 1.0
    return x - lr * ratio * u, m, v


@pytest.mark.parametrize("bias_correction,clip", [(True, None), (False, None), (True, 0.3)])
def test_lamb_follows_the_paper(bias_correction, clip):
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (3,), (2, 2)]
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    xs[2].zero_()  # a zero layer: trust ratio 1
    ps = [torch.nn.Parameter(x.clone()) for x in xs]
    hp = dict(lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    opt = Lamb(ps, bias_correction=bias_correction, trust_clip=clip, **hp)
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    for t in range(1, 5):
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(gs):
            xs[i], ms[i], vs[i] = lamb_by_hand(
                xs[i], g, ms[i], vs[i], t, hp["lr"], *hp["betas"], hp["eps"], hp["weight_decay"],
                bias_correction, clip,
            )
            assert torch.allclose(ps[i].detach(), xs[i], rtol=1e-12, atol=1e-14), (t, i)


def test_lamb_half_precision_uses_float32_moments():
    p32 = torch.nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(1)))
    pbf = torch.nn.Parameter(p32.detach().bfloat16())
    o32, obf = Lamb([p32], lr=0.01), Lamb([pbf], lr=0.01)
    for _ in range(3):
        g = torch.randn(16)
        p32.grad, pbf.grad = g.clone(), g.bfloat16()
        o32.step()
        obf.step()
    assert obf.state[pbf]["exp_avg"].dtype == torch.float32
    assert pbf.dtype == torch.bfloat16
    assert torch.allclose(pbf.detach().float(), p32.detach(), rtol=2e-2, atol=2e-2)


def test_lamb_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in [dict(lr=-1), dict(betas=(1.0, 0.9)), dict(eps=-1), dict(weight_decay=-1), dict(trust_clip=0)]:
        with pytest.raises(ValueError):
            Lamb(p, **kwargs)


def test_wrapper_rejects_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError):
        DistributedOptimizer(torch.optim.SGD(p, lr=0.1), backward_passes_per_step=0)
    with pytest.raises(TypeError):
        DistributedOptimizer(object())
