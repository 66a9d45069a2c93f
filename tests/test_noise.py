"""The gradient noise scale: unbiased on a problem whose G and Sigma are known exactly, the same
on real process groups as in one process for every reducer and front door, and NaN (never an
error) where it is undefined."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import adasum
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer
from conftest import TIMEOUT, rel_err

# Two layers; per layer the true gradient G and the per-example covariance diag(VAR).
G = [torch.linspace(-1.0, 1.0, 30, dtype=torch.float64), torch.full((10,), 0.3, dtype=torch.float64)]
VAR = [torch.linspace(0.5, 4.0, 30, dtype=torch.float64), torch.full((10,), 2.0, dtype=torch.float64)]
TRUE_GRAD_SQ = torch.stack([g.square().sum() for g in G])
TRUE_TRACE = torch.stack([v.sum() for v in VAR])
BATCH = 8  # examples behind each rank's gradient


def draw(ranks: int, gen: torch.Generator) -> list[list[torch.Tensor]]:
    """Each rank's gradient of the mean loss over BATCH examples: G plus noise of covariance
    diag(VAR) / BATCH (Gaussian, so the draws are exactly what the estimator assumes)."""
    return [[g + torch.randn(g.shape, generator=gen, dtype=torch.float64) * (v / BATCH).sqrt()
             for g, v in zip(G, VAR)] for _ in range(ranks)]


def estimates(reducer: adasum.Reducer, ranks: int, draws: int, batch: float = BATCH):
    """``[draws, layers]`` estimates of |G|^2 and tr(Sigma) from independent steps."""
    gen = torch.Generator().manual_seed(3)
    rows = [reducer.reduce(draw(ranks, gen), stats=True)[1].noise_scale(batch) for _ in range(draws)]
    return torch.stack([r.grad_sq for r in rows]), torch.stack([r.trace for r in rows])


def within(samples: torch.Tensor, truth: torch.Tensor, z: float) -> bool:
    """Whether the mean of ``samples`` is within ``z`` standard errors of ``truth``, per layer."""
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((mean - truth).abs() <= z * se).all())


REDUCERS = {"adasum": adasum.Adasum(), "average": adasum.Average(), "sum": adasum.Sum(),
            "hierarchical": adasum.Hierarchical(2)}


@pytest.mark.parametrize("name", list(REDUCERS))
def test_both_ingredients_are_unbiased_on_a_known_problem(name):
    grad_sq, trace = estimates(REDUCERS[name], ranks=4, draws=600)
    assert within(grad_sq, TRUE_GRAD_SQ, 4.0), (grad_sq.mean(0), TRUE_GRAD_SQ)
    assert within(trace, TRUE_TRACE, 4.0), (trace.mean(0), TRUE_TRACE)
    # The test has the power to see a wrong batch size: the trace scales with it.
    _, wrong = estimates(REDUCERS[name], ranks=4, draws=600, batch=2 * BATCH)
    assert not within(wrong, TRUE_TRACE, 4.0)


def test_the_whole_model_pools_layers_and_smoothing_converges():
    gen, running = torch.Generator().manual_seed(5), adasum.RunningNoiseScale(decay=0.99)
    for _ in range(800):
        running.update(adasum.Adasum().reduce(draw(8, gen), stats=True)[1].noise_scale(BATCH))
    truth = float(TRUE_TRACE.sum() / TRUE_GRAD_SQ.sum())
    assert abs(running.value - truth) / truth < 0.1, (running.value, truth)
    one = adasum.Average().reduce(draw(4, gen), stats=True)[1].noise_scale(BATCH)
    assert one.simple() == pytest.approx(float(one.trace.sum() / one.grad_sq.sum()))
    assert one.summary()["noise/scale"] == one.simple()


def test_undefined_is_nan_and_bad_input_raises():
    gen = torch.Generator().manual_seed(0)
    for reducer in REDUCERS.values():
        if isinstance(reducer, adasum.Hierarchical):
            continue  # one rank cannot make nodes of two
        _, stats = reducer.reduce(draw(1, gen), stats=True)
        assert math.isnan(stats.noise_scale(BATCH).simple())
    running = adasum.RunningNoiseScale()
    assert math.isnan(running.value)
    nan = adasum.NoiseScale(torch.full((2,), math.nan, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert math.isnan(running.update(nan))  # a non-finite step is left out
    _, stats = adasum.Adasum().reduce(draw(2, gen), stats=True)
    with pytest.raises(ValueError, match="positive number of examples"):
        stats.noise_scale(0)
    with pytest.raises(ValueError, match="decay"):
        adasum.RunningNoiseScale(decay=1.0)


def test_named_and_joined_statistics_keep_the_moments():
    gen = torch.Generator().manual_seed(1)
    per_rank = draw(4, gen)
    _, whole = adasum.Adasum().reduce(per_rank, stats=True)
    parts = [adasum.Adasum().reduce([[r[i]] for r in per_rank], stats=True)[1] for i in range(2)]
    joined = adasum.Stats.concat(parts).named(["w", "b"])
    assert torch.equal(joined.moments.small, whole.moments.small)
    assert torch.equal(joined.moments.large, whole.moments.large)
    assert set(joined.noise_scale(BATCH).summary()) >= {"noise/layer/w/scale", "noise/layer/b/scale"}
    assert "adasum/noise/scale" in joined.summary(batch=BATCH)


# -- on real process groups ------------------------------------------------------------------


def _collective_moments(rank: int, world: int) -> dict:
    per_rank = draw(world, torch.Generator().manual_seed(11))
    reducers = {"vhdd": adasum.Adasum(algorithm="vhdd"), "gather": adasum.Adasum(algorithm="gather"),
                "average": adasum.Average(), "sum": adasum.Sum()}
    if world % 2 == 0:
        reducers["hierarchical"] = adasum.Hierarchical(2)
    out = {}
    for name, reducer in reducers.items():
        with reducer:
            stats = reducer.all_reduce([t.clone() for t in per_rank[rank]], stats=True)
        out[name] = stats.moments
    # Delta mode: the moments are the gradients', not the deltas' (Adam's deltas have about
    # the same size whatever the gradient, so their moments would differ).
    model = torch.nn.Linear(30, 10, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(0.1)
        model.bias.zero_()
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), stats=True)
    model.weight.grad = per_rank[rank][0].repeat(10, 1) / 10
    model.bias.grad = per_rank[rank][1].clone()
    opt.step()
    out["delta"] = opt.last_stats.moments
    out["delta_stages"] = opt.last_stats.stages
    dist.barrier()
    return out


@pytest.mark.parametrize("world", [3, 4])
def test_every_reducer_and_delta_mode_give_the_single_process_moments(world):
    results = spawn(_collective_moments, world, timeout=TIMEOUT)
    per_rank = draw(world, torch.Generator().manual_seed(11))
    expected = {"vhdd": adasum.Adasum(), "gather": adasum.Adasum(), "average": adasum.Average(),
                "sum": adasum.Sum()}
    if world % 2 == 0:
        expected["hierarchical"] = adasum.Hierarchical(2)
    for name, reducer in expected.items():
        want = reducer.reduce(per_rank, stats=True)[1].moments
        for r in results:
            got = r[name]
            assert (got.small_ranks, got.large_ranks) == (want.small_ranks, want.large_ranks), name
            assert rel_err(got.small, want.small) < 1e-12 and rel_err(got.large, want.large) < 1e-12, name
    grads = [[r[0].repeat(10, 1) / 10, r[1]] for r in per_rank]
    want = adasum.Average().reduce(grads, stats=True)[1].moments
    for r in results:
        assert rel_err(r["delta"].small, want.small) < 1e-12 and rel_err(r["delta"].large, want.large) < 1e-12
        assert r["delta_stages"]  # the deltas' own combinations are still there
