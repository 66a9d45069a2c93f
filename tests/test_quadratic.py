"""The noisy quadratic model (``nqm``): its stream has the moments the model says, the exact
expected course agrees with a direct Monte Carlo of the same optimizer and with the simulator's
averaging runs, and the library's noise scale measures its known B_simple."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adasum.lab.config import RunConfig, Steps
from adasum.lab.critical import fit_critical_batch
from adasum.lab.quadratic import (
    DIM,
    b_simple,
    curvatures,
    expected_critical,
    expected_scores,
    expected_steps,
    nqm_task,
    sampled_crossings,
)
from adasum.lab.simulate import gradient_noise, simulate_run
from adasum.lab.tasks import load_task

H = curvatures().numpy()


def _gradients(n: int, start: int = 0) -> torch.Tensor:
    """Per-example gradients of the loss at theta_0 = 1, through the model and autograd."""
    task = nqm_task(1 << 20)
    model = task.build_model(0)
    x, y = task.examples(torch.arange(start, start + n))
    grads = []
    for row in range(n):
        model.zero_grad()
        task.loss(model(x[row : row + 1]), y[row : row + 1]).backward()
        grads.append(model.theta.grad.clone())
    return torch.stack(grads).double()


def test_the_stream_gradient_has_mean_h_theta_and_covariance_h():
    g = _gradients(20000).numpy()
    n = len(g)
    # Mean H theta_0 = h, each coordinate within 4.5 standard errors sqrt(h / n).
    assert np.all(np.abs(g.mean(0) - H) <= 4.5 * np.sqrt(H / n))
    # Variances h (a variance's relative standard error is sqrt(2 / n), 1%); no correlations.
    assert np.all(np.abs(g.var(0) / H - 1) <= 4.5 * np.sqrt(2 / n))
    corr = np.corrcoef(g.T)[np.triu_indices(DIM, 1)]
    assert np.abs(corr).max() <= 4.5 / np.sqrt(n) * 1.5  # the largest of 2,016 near-normal draws


def test_the_score_is_the_share_of_the_initial_loss_removed():
    task = nqm_task(64)
    model = task.build_model(3)
    with torch.no_grad():
        model.theta.mul_(0.5)  # a quarter of the loss left
    (x, y), = task.test_batches()
    assert task.score(model(x), y) == pytest.approx(0.75, abs=1e-6)
    assert b_simple(model.theta.detach()) == pytest.approx(H.sum() / (0.25 * (H**2).sum()))


def _monte_carlo(rates: list[float], examples: int, momentum: float, runs: int, rng) -> np.ndarray:
    """Mean score over ``runs`` independent heavy-ball runs on gradients H theta + noise of
    variance h / examples, drawn directly (no recursion of moments)."""
    theta, v = np.ones((runs, DIM)), np.zeros((runs, DIM))
    scores = []
    for eta in rates:
        g = H * theta + rng.standard_normal((runs, DIM)) * np.sqrt(H / examples)
        v = momentum * v + g
        theta = theta - eta * v
        scores.append(1 - (H * theta**2).sum(1) / H.sum())
    return np.array(scores)  # [steps, runs]


@pytest.mark.parametrize("momentum, examples", [(0.0, 4), (0.9, 16), (0.9, 256)])
def test_the_expected_course_matches_a_monte_carlo_of_the_optimizer(momentum, examples):
    rates = list(np.linspace(0.02, 0.3, 10)) + [0.3] * 50 + list(np.linspace(0.3, 0.01, 40))
    sampled = _monte_carlo(rates, examples, momentum, 4000, np.random.default_rng(1))
    mean, error = sampled.mean(1), sampled.std(1) / np.sqrt(sampled.shape[1])
    exact = expected_scores(rates, examples, momentum)
    assert np.all(np.abs(mean - exact) <= 5 * error + 1e-12), np.abs(mean - exact).max()


@pytest.mark.timeout(120)
def test_the_simulators_averaging_follows_the_expected_course():
    """Four averaged workers of 16: the mean over seeds of the simulated score sits within
    its standard error of the exact expectation at batch 64, and the steps to 0.95 agree."""
    config = RunConfig(task="nqm", samples=64 * 120, reducer="average", optimizer="momentum", lr=0.2, batch=16,
                       epochs=1, evals_per_epoch=120, warmup=10, schedule="cosine")
    task = load_task("nqm", samples=config.samples)
    steps = Steps(config.validated(), 4, task.train_size)
    exact = expected_scores([steps.lr_at(t) for t in range(steps.total_steps)], 64, 0.9)
    runs = []
    for seed in range(8):
        history, _ = simulate_run(task, config.with_(seed=seed), 4, distances=False)
        runs.append([r["score"] for r in history if "score" in r])
    scores = np.array(runs)
    assert scores.shape == (8, steps.total_steps)
    mean, error = scores.mean(0), scores.std(0, ddof=1) / np.sqrt(len(scores))
    assert np.all(np.abs(mean - exact) <= 5 * error + 1e-6)
    crossings = [int(np.argmax(s >= 0.95)) + 1 for s in scores]
    assert abs(np.median(crossings) - (int(np.argmax(exact >= 0.95)) + 1)) <= 2, crossings


def test_the_noise_scale_measures_the_known_b_simple():
    """At theta_0, |G|^2 = sum h^2 and tr(Sigma) = sum h exactly: the library's unbiased
    estimates from 8 workers of 4 examples, averaged over 400 steps' worth of draws."""
    g = _gradients(400 * 32, start=1 << 19).view(400, 8, 4, DIM).mean(2).float()
    noise = [gradient_noise([step], 4) for step in g]  # one parameter, [workers, DIM]
    grad_sq = np.array([n.grad_sq.sum().item() for n in noise])
    trace = np.array([n.trace.sum().item() for n in noise])
    for estimates, exact in ((grad_sq, (H**2).sum()), (trace, H.sum())):
        assert abs(estimates.mean() - exact) <= 4.5 * estimates.std() / np.sqrt(len(estimates)), (estimates.mean(), exact)
    assert trace.mean() / grad_sq.mean() == pytest.approx(b_simple(torch.ones(DIM)), rel=0.05)


def test_the_exact_critical_batch_follows_the_empirical_model():
    """Below B_crit doubling E about halves the steps, far above it they level off at S_min."""
    points = expected_critical(0.98, [8, 16, 32, 512, 2048], [0.0125 * 2 ** (k / 4) for k in range(29)], 0.9)
    (e, steps, lrs) = zip(*points)
    assert e == (8, 16, 32, 512, 2048)
    assert 1.8 <= steps[0] / steps[1] <= 2.2 and steps[3] - steps[4] <= 3
    fit = fit_critical_batch(e, steps)
    assert 50 <= fit.b_crit <= 120 and 20 <= fit.s_min <= 35


@pytest.mark.timeout(120)
def test_drawn_runs_cross_where_the_simulators_runs_do():
    """At E = 8 and a constant rate, runs are noisy: the simulator's steps to 0.98 (8 seeds, an
    evaluation every step) lie within the 1,000 directly drawn runs' 99% range, and their
    median within the 99% range of a median of 8 such draws (seeds fixed: deterministic). With E = 4,096 the noise is
    negligible and every drawn run crosses where the expected score does."""
    drawn = sampled_crossings(0.98, 8, 0.05, 0.9, runs=1000, horizon=1024)
    assert (drawn > 0).all()
    config = RunConfig(task="nqm", samples=8 * 1024, reducer="average", optimizer="momentum", lr=0.05, batch=2,
                       epochs=1, evals_per_epoch=1024, target=0.98)
    task = load_task("nqm", samples=config.samples)
    simulated = [simulate_run(task, config.with_(seed=seed), 4, distances=False)[1]["steps_to_target"]
                 for seed in range(8)]
    low, high = np.percentile(drawn, [0.5, 99.5])
    assert all(low <= s <= high for s in simulated), (simulated, low, high)
    medians = np.median(np.random.default_rng(0).choice(drawn, (2000, 8)), 1)
    assert np.percentile(medians, 0.5) <= np.median(simulated) <= np.percentile(medians, 99.5)
    calm = sampled_crossings(0.98, 1 << 20, 0.4, 0.9, runs=50, horizon=256)
    assert set(calm.tolist()) <= {expected_steps(0.98, 1 << 20, 0.4, 0.9) + d for d in (-1, 0)}
