r"""The noisy quadratic model (Zhang, Li, Nado et al. 2019, "Which algorithmic choices matter at
which batch sizes?"): a task whose every large-batch quantity is known in closed form, so the
study's harness (the simulator, the crossing rule, the critical-batch fit) can be checked
against it in seconds.

Example :math:`c` of the stream ``nqm`` is :math:`N(0, H^{-1})` in :math:`d` = :data:`DIM`
dimensions, :math:`H = \mathrm{diag}(h)`, :math:`h_i = 1/i`, and its loss is

.. math::  \ell(\theta; c) = \tfrac12 \sum_i h_i (\theta_i - c_i)^2 .

Its gradient :math:`H(\theta - c)` has mean :math:`G = H\theta` and covariance
:math:`\Sigma = H` (the model's :math:`C = H`); the expected loss is
:math:`L(\theta) + d/2` with :math:`L(\theta) = \tfrac12 \theta^\top H \theta`. Hence at every
:math:`\theta`, exactly,

.. math::  B_\text{simple} = \frac{\operatorname{tr}\Sigma}{|G|^2} = \frac{\sum_i h_i}{\sum_i h_i^2 \theta_i^2}.

The model is :math:`\theta` alone, :math:`\theta_0 = 1` for every seed (the seed varies only the
order of the examples), and the score is the fraction of the initial excess loss removed,
:math:`1 - L(\theta)/L(\theta_0)`: at most 1, reached only at :math:`\theta = 0`. The test set
is the single example :math:`c = 0`, on which the loss is :math:`L(\theta)` itself.

Averaging N workers' gradients of E/N examples each is one step on a gradient of noise
:math:`H/E`, so the expected course of averaging (and of one worker at batch E) follows a
linear recursion of second moments per coordinate (:func:`expected_scores`), with any learning
rate schedule and heavy-ball momentum. Adasum is not linear; the harness runs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adasum.lab.synthetic import _capacity, _Stream
from adasum.lab.task import TaskError

__all__ = ["NQM_TASKS", "NoisyQuadratic", "nqm_task", "curvatures", "b_simple", "expected_scores", "expected_moments",
           "expected_steps", "expected_critical", "DIM"]

NQM_TASKS = ("nqm",)
#: Dimensions of the model (even: the stream makes normals in pairs).
DIM = 64
DEFAULT_SAMPLES = 1 << 22


def curvatures(dim: int = DIM) -> torch.Tensor:
    """The diagonal of H: 1, 1/2, ..., 1/dim."""
    return 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)


def b_simple(theta: torch.Tensor) -> float:
    """McCandlish's simple noise scale at ``theta``, exactly (see the module's description)."""
    h = curvatures(theta.numel())
    return (h.sum() / (h.square() * theta.double().square()).sum()).item()


class _Point(nn.Module):
    """The model: ``theta``, whose output for examples c is sqrt(h) (theta - c), so that half
    its squared length is the example's loss."""

    root: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(dim))
        self.register_buffer("root", curvatures(dim).sqrt().float(), persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.root * (self.theta - c)


@dataclass(frozen=True, eq=False, kw_only=True)
class NoisyQuadratic(_Stream):
    """``nqm``: examples c = z / sqrt(h) from the stream's standard normals z."""

    root: torch.Tensor
    kind = "quadratic"

    def label(self, normals, uniform):
        # The target is unused (the loss is the output's own length); it keeps one per example.
        return normals / self.root, torch.zeros(len(normals), device=normals.device)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.x_test, self.y_test

    def build_model(self, seed: int) -> nn.Module:
        return _Point(self.dim)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * output.square().sum(-1).mean()

    def score(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """1 - L(theta) / L(theta_0) from the output at c = 0 (the test set)."""
        initial = 0.5 * self.root.double().square().sum()
        return (1 - self.loss(output.double(), target) / initial).item()

    def to(self, device: torch.device) -> NoisyQuadratic:
        return self._moved(device, ("root",))


def nqm_task(samples: int | None = None) -> NoisyQuadratic:
    """The ``nqm`` stream with ``samples`` training examples (default :data:`DEFAULT_SAMPLES`)."""
    samples = samples or DEFAULT_SAMPLES
    if samples > _capacity(DIM):
        raise TaskError(f"--samples of task 'nqm' can be at most {_capacity(DIM)} (the generator's key space)")
    zero = torch.zeros(1, DIM)
    return NoisyQuadratic("nqm", samples, DIM, zero, torch.zeros(1), root=curvatures().sqrt().float())


def _second_moments(rates: Sequence[float], examples_per_step: int, momentum: float,
                    dim: int) -> Iterator[np.ndarray]:
    r"""E(theta_i^2) after each step (see :func:`expected_scores`). Per coordinate, with
    :math:`s = h/E` the variance of the averaged gradient's noise :math:`\xi`, the update

    .. math::  \theta' = (1 - \eta h)\theta - \eta\mu v - \eta\xi, \qquad v' = h\theta + \mu v + \xi

    is linear, so the moments :math:`(a, b, c) = E(\theta^2, \theta v, v^2)` follow it exactly."""
    h = curvatures(dim).numpy()
    s = h / examples_per_step
    a, b, c = np.ones(dim), np.zeros(dim), np.zeros(dim)
    for eta in rates:
        tt, tv, vt, vv = 1 - eta * h, -eta * momentum, h, momentum  # theta' and v' from (theta, v)
        a, b, c = (tt * tt * a + 2 * tt * tv * b + tv * tv * c + eta * eta * s,
                   tt * vt * a + (tt * vv + tv * vt) * b + tv * vv * c - eta * s,
                   vt * vt * a + 2 * vt * vv * b + vv * vv * c + s)
        yield a


def expected_scores(rates: Sequence[float], examples_per_step: int, momentum: float = 0.0,
                    dim: int = DIM) -> np.ndarray:
    r"""The expected score after each step of one optimizer on the gradient of
    ``examples_per_step`` fresh examples, at learning rate ``rates[t]`` for step t, from
    :math:`\theta_0 = 1`: torch's SGD (``momentum`` 0) or heavy ball (:math:`v \leftarrow \mu v + g`,
    :math:`\theta \leftarrow \theta - \eta v`). The expected excess loss is
    :math:`\tfrac12 \sum_i h_i E(\theta_i^2)`; averaging N workers' gradients of E/N examples
    each is the same step."""
    h = curvatures(dim).numpy()
    moments = _second_moments(rates, examples_per_step, momentum, dim)
    return np.array([1 - (h * a).sum() / h.sum() for a in moments])


def expected_moments(rates: Sequence[float], examples_per_step: int, momentum: float = 0.0,
                     dim: int = DIM) -> np.ndarray:
    """E(theta_i^2) after the last of ``rates``' steps (:func:`expected_scores`)."""
    last = np.ones(dim)
    for last in _second_moments(rates, examples_per_step, momentum, dim):  # noqa: B007 (the last is kept)
        continue
    return last


def expected_steps(target: float, examples_per_step: int, lr: float, momentum: float = 0.0,
                   horizon: int = 4096) -> int | None:
    """Steps at the constant rate ``lr`` until the expected score first reaches ``target``
    (None within ``horizon`` steps)."""
    reached = np.nonzero(expected_scores([lr] * horizon, examples_per_step, momentum) >= target)[0]
    return int(reached[0]) + 1 if len(reached) else None


def expected_critical(target: float, examples: Sequence[int], lrs: Sequence[float], momentum: float = 0.0,
                      horizon: int = 4096) -> list[tuple[int, int, float]]:
    """``(E, steps, lr)``: for each E of ``examples``, the fewest expected steps to ``target``
    over the constant rates ``lrs`` and the rate that gives them; the exact counterpart of a
    critical-batch sweep (``scripts/critical-sweep.sh``), to fit with
    :func:`adasum.lab.critical.fit_critical_batch`. An E where no rate reaches the target is left out."""
    best = []
    for e in examples:
        found = [(s, lr) for lr in lrs if (s := expected_steps(target, e, lr, momentum, horizon)) is not None]
        if found:
            steps, lr = min(found)
            best.append((e, steps, lr))
    return best


def sampled_crossings(target: float, examples_per_step: int, lr: float, momentum: float = 0.0, *,
                      runs: int = 1000, horizon: int = 1024, seed: int = 0) -> np.ndarray:
    """Steps to ``target`` of ``runs`` independent runs at the constant rate ``lr``, each drawn
    directly: the gradient of E fresh examples is :math:`H\\theta` plus Gaussian noise of
    covariance H/E, exactly the stream's (its examples are Gaussian). A run reaches the target
    as the study's runs do, at the first of two consecutive steps at or above it
    (:func:`adasum.lab.records.crossing`, evaluating every step); -1 where it does not within
    ``horizon`` steps. The first passage of a noisy score comes before the expected score's
    crossing where the expected score levels off near the target."""
    h = curvatures().numpy()
    rng = np.random.default_rng(seed)
    theta, v = np.ones((runs, len(h))), np.zeros((runs, len(h)))
    steps = np.full(runs, -1)
    above = np.zeros(runs, dtype=bool)
    for t in range(1, horizon + 1):
        v = momentum * v + h * theta + rng.standard_normal(theta.shape) * np.sqrt(h / examples_per_step)
        theta = theta - lr * v
        now = 1 - (h * theta**2).sum(1) / h.sum() >= target
        steps[(steps < 0) & above & now] = t - 1  # the first of the two
        above = now
        if (steps >= 0).all():
            break
    return steps
