r"""``adasum noise``: the critical batch of a task, measured, and the fit that bounds a sweep.

McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training": the
steps S a run needs to reach a target at E examples per step follow

.. math::  S = S_\text{min} \, (1 + B_\text{crit} / E),

so below the critical batch B_crit doubling E halves the steps, and far above it no E takes
fewer than S_min. The simple gradient noise scale B_simple, measured where the target is
reached, estimates B_crit. A sweep of E that is to test a large-batch method must therefore run
from below B_crit to well above it, with enough steps at its largest E to tell methods apart.

The measurement is one run of one worker at batch E, and it is taken in the simulator as k
workers of E/k examples each whose gradients are averaged: for SGD and momentum that is the
same training as one worker (the mean loss over E examples), and the k gradients give the noise
scale for free (:func:`adasum.lab.simulate.gradient_noise`). Delta mode is refused (Adam and
LAMB by default: pass ``--mode gradient``): each worker's own optimizer normalises its own
gradient, which is not one worker's step at batch E; in gradient mode one optimizer steps on the
averaged gradient, which is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adasum.lab.bootstrap import LEVEL
from adasum.lab.config import ConfigError, RunConfig
from adasum.lab.simulate import simulate_run
from adasum.lab.task import Task

__all__ = ["one_worker_config", "measure_noise", "evaluations", "first_reaching", "noise_report",
           "CriticalFit", "fit_critical_batch", "read_sweep", "best_rates", "best_median_rates",
           "median_steps", "fit_over_seeds"]


def one_worker_config(config: RunConfig, workers: int) -> RunConfig:
    """The simulated run equivalent to one worker at ``config.batch`` examples per step:
    ``workers`` workers of ``batch / workers`` examples, averaged. ConfigError if that is not
    the same training (delta mode) or the batch does not split evenly."""
    if config.reduces_deltas:
        raise ConfigError(f"{config.optimizer} runs in delta mode here, where averaging the workers' updates "
                          "is not one worker's step: measure in gradient mode (--mode gradient)")
    if workers < 2:
        raise ConfigError(f"--workers must be at least 2 (the noise scale compares two batch sizes), got {workers}")
    if config.batch % workers:
        raise ConfigError(f"--batch {config.batch} must be a multiple of --workers {workers}")
    return config.with_(reducer="average", batch=config.batch // workers).validated()


def measure_noise(task: Task, config: RunConfig, workers: int = 8, *, device: str | torch.device = "cpu",
                  worker_chunk: int | None = None, progress: bool = False) -> tuple[list[dict], dict]:
    """``(history, summary)`` of the one-worker-equivalent run of ``config`` (its ``batch`` is
    the one worker's) taken as ``workers`` averaged workers (:func:`one_worker_config`)."""
    return simulate_run(task, one_worker_config(config, workers), workers, distances=False,
                        device=device, worker_chunk=worker_chunk, progress=progress)


def evaluations(history: Sequence[dict], examples_per_step: int) -> list[dict]:
    """The evaluation rows of ``history``: step, examples seen, score and smoothed B_simple."""
    return [{"step": r["step"], "examples": r["step"] * examples_per_step, "score": r["score"],
             "noise_scale": r["noise_scale"]} for r in history if "score" in r]


def first_reaching(rows: Sequence[dict], level: float) -> dict | None:
    """The first of the evaluation ``rows`` whose score is at least ``level`` (None if none is):
    where a run with that target would have stopped, and its noise scale there."""
    return next((r for r in rows if r["score"] >= level), None)


def noise_report(history: Sequence[dict], summary: dict, levels: Sequence[float] = ()) -> list[str]:
    """The lines ``adasum noise`` prints: the run, one line per evaluation, B_simple where each
    of ``levels`` (other candidate targets) was first reached, then where the target was and at
    the end, and the steps the run took to the target."""
    per_step = summary["examples_per_step"]
    rows = evaluations(history, per_step)
    lines = [f"{summary['task']}: {summary['optimizer']} lr {summary['lr']:g}, batch {per_step} "
             f"({summary['workers']} averaged workers x {summary['batch'] * summary['accum']})",
             f"{'step':>8} {'examples':>12} {'score':>8} {'B_simple':>10}"]
    lines += [f"{r['step']:>8} {r['examples']:>12,} {r['score']:>8.4f} {r['noise_scale']:>10.4g}" for r in rows]
    for level in levels:
        row = first_reaching(rows, level)
        lines.append(f"score {level:g} not reached" if row is None else
                     f"score {level:g} first at step {row['step']} ({row['examples']:,} examples): "
                     f"B_simple {row['noise_scale']:.4g}")
    reached, target = summary["steps_to_target"], summary["target"]
    if target is None:
        lines.append("no --target given: B_simple at the target not measured")
    elif reached is None:
        lines.append(f"target {target:g} not reached in {summary['steps']} steps")
    else:
        lines.append(f"target {target:g} first reached at step {reached} ({reached * per_step:,} examples): "
                     f"B_simple {summary['noise_scale_at_target']:.4g}")
    if rows:
        last = rows[-1]
        lines.append(f"end, step {last['step']} ({last['examples']:,} examples): score {last['score']:.4f}, "
                     f"B_simple {last['noise_scale']:.4g}")
    steps = reached if reached is not None else "not reached" if target is not None else "no target set"
    lines.append(f"steps to target: {steps} at E = {per_step}; "
                 f"{summary['seconds']:.0f} s ({summary['seconds_per_step']:.3g} s/step)")
    return lines


@dataclass(frozen=True)
class CriticalFit:
    """``S = s_min (1 + b_crit / E)`` fitted to (E, S) points. ``e_min = s_min * b_crit`` is
    McCandlish's fewest training examples (reached as E goes to 0); ``residual`` the root mean
    square relative error of the fit."""

    s_min: float
    b_crit: float
    residual: float

    @property
    def e_min(self) -> float:
        return self.s_min * self.b_crit

    def steps(self, examples_per_step: float) -> float:
        """The fitted steps to the target at ``examples_per_step``."""
        return self.s_min * (1 + self.b_crit / examples_per_step)


def fit_critical_batch(examples_per_step: Sequence[float], steps: Sequence[float]) -> CriticalFit:
    """Fit ``S = s_min (1 + b_crit / E)`` to steps to target ``steps`` measured at
    ``examples_per_step``. The model is linear in (s_min, s_min * b_crit) against (1, 1/E);
    each point is weighted by 1/S, so the fit minimises relative errors (the spread of steps
    over seeds grows with the steps). ValueError for fewer than two distinct E or points the
    model cannot fit (steps that do not fall as E grows, or never level off)."""
    e = torch.as_tensor(examples_per_step, dtype=torch.float64)
    s = torch.as_tensor(steps, dtype=torch.float64)
    if e.shape != s.shape or e.ndim != 1:
        raise ValueError(f"need as many steps as E values, got {tuple(e.shape)} and {tuple(s.shape)}")
    if not (torch.all(e > 0) and torch.all(s > 0) and torch.isfinite(e).all() and torch.isfinite(s).all()):
        raise ValueError("E and steps must be positive and finite")
    if len(e.unique()) < 2:
        raise ValueError("the fit needs steps at two or more distinct E")
    design = torch.stack([torch.ones_like(e), 1 / e], 1) / s[:, None]
    (a, c), *_ = torch.linalg.lstsq(design, torch.ones_like(s)[:, None], rcond=None)
    a, c = a.item(), c.item()
    if a <= 0:
        raise ValueError("the steps never level off (S_min <= 0): the largest E is below the critical batch")
    if c <= 0:
        raise ValueError("the steps do not fall as E grows: every E is above the critical batch")
    fitted = a + c / e
    residual = math.sqrt(((fitted - s) / s).square().mean().item())
    return CriticalFit(s_min=a, b_crit=c / a, residual=residual)


def read_sweep(root: str | Path) -> list[dict]:
    """The runs of one sweep directory as ``scripts/critical-sweep.sh`` lays it out (each run's
    ``summary.json`` one folder down): E, lr, seed, the steps to the target (None where it was
    not reached), the run's budget in steps and B_simple where the target was reached."""
    runs = []
    for path in sorted(Path(root).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        runs.append({"E": summary["examples_per_step"], "lr": summary["lr"], "seed": summary["seed"],
                     "steps": summary["steps_to_target"], "budget": summary["steps"],
                     "noise_scale": summary["noise_scale_at_target"]})
    return runs


def best_rates(runs: Sequence[dict], seed: int = 0) -> dict[int, float]:
    """Per E, the rate whose run with ``seed`` reaches the target in the fewest steps (the lower
    rate on a tie). An E where no rate reaches it has none."""
    best: dict[int, float] = {}
    for run in sorted((r for r in runs if r["seed"] == seed and r["steps"] is not None),
                      key=lambda r: (r["steps"], r["lr"])):
        best.setdefault(run["E"], run["lr"])
    return best


def best_median_rates(runs: Sequence[dict], min_seeds: int = 3) -> dict[int, float]:
    """Per E, among the rates run with at least ``min_seeds`` seeds, the one of the fewest median
    steps to the target (the lower rate on a tie). Seed 0's best (:func:`best_rates`) is biased
    where runs are noisy: of a dozen rates, the luckiest draw wins."""
    seeds: dict[tuple[int, float], list[float | None]] = {}
    for r in runs:
        seeds.setdefault((r["E"], r["lr"]), []).append(r["steps"])
    best: dict[int, tuple[float, float]] = {}
    for (e, lr), steps in sorted(seeds.items()):
        if len(steps) >= min_seeds and math.isfinite(median := median_steps(steps)):
            if e not in best or median < best[e][0]:
                best[e] = (median, lr)
    return {e: lr for e, (_, lr) in best.items()}


def _as_steps(values: Sequence[float | None]) -> np.ndarray:
    """Steps to the target per seed, a run that never reached it as infinitely many."""
    return np.array([math.inf if s is None else s for s in values], dtype=float)


def median_steps(values: Sequence[float | None]) -> float:
    """The median steps to the target over seeds (a run that never reached it counts as
    infinitely many, so the median is infinite when most did not)."""
    return float(np.median(_as_steps(values)))


def fit_over_seeds(steps: dict[int, Sequence[float | None]], *, draws: int = 2000, level: float = LEVEL,
                   seed: int = 0) -> tuple[CriticalFit, tuple[float, float], tuple[float, float]]:
    """``(fit, b_crit interval, s_min interval)``: :func:`fit_critical_batch` of the median steps
    over seeds at each E (a run that never reached the target counts as infinitely many steps;
    an E whose median is infinite is left out), and percentile bootstrap intervals at ``level``
    of B_crit and S_min, each draw resampling every E's seeds with replacement. Draws the model
    cannot fit are left out of the intervals."""
    data = {e: _as_steps(values) for e, values in steps.items()}

    def fit(medians: dict[int, float]) -> CriticalFit:
        finite = {e: m for e, m in medians.items() if math.isfinite(m)}
        return fit_critical_batch(list(finite), list(finite.values()))

    estimate = fit({e: float(np.median(v)) for e, v in data.items()})
    rng = np.random.default_rng(seed)
    b_crit, s_min = [], []
    for _ in range(draws):
        try:
            drawn = fit({e: float(np.median(v[rng.integers(0, len(v), len(v))])) for e, v in data.items()})
        except ValueError:
            continue
        b_crit.append(drawn.b_crit)
        s_min.append(drawn.s_min)
    tails = [(1 - level) / 2, (1 + level) / 2]
    low_b, high_b = np.quantile(b_crit, tails) if b_crit else (math.nan, math.nan)
    low_s, high_s = np.quantile(s_min, tails) if s_min else (math.nan, math.nan)
    return estimate, (float(low_b), float(high_b)), (float(low_s), float(high_s))
