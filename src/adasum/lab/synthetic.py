r"""Streaming synthetic tasks: fresh examples made on demand from their index, so a run can see
millions of examples once each (one epoch) with memory for none of them. They exist to put the
critical batch (McCandlish et al. 2018) in the thousands on a CPU, where the study's
examples-before-communication E can sweep from below it to far above it.

Example i is a pure function of i: its ``dim`` standard normal inputs and one uniform number
(the label's draw) come from a counter-based generator, a 32-bit integer hash of the key
``i * (dim + 1) + j`` turned into normals by Box-Muller. Hashing a counter, not stepping a
generator, is what lets a step ask for any examples in any order and get the same numbers in
the simulator, in every worker of ``adasum train`` and for every ``samples`` that includes i.
The test set is the last :data:`TEST_SIZE` examples of the key space, which no training set can
reach, so it is the same whatever ``samples`` is.

* ``gauss-logistic``: K equally likely classes in ``dim`` dimensions, the inputs
  ``D (mu_y + z)`` with z standard normal, the means of equal length ``r`` along random
  orthonormal directions and D a diagonal of scales log-spaced from 1 down to 1/``spread``, and
  a linear model (multinomial logistic regression). The model is well specified (the true
  posterior is a softmax of a linear function) and the Bayes-optimal accuracy is known, D being
  invertible: :math:`\int \varphi(t)\,\Phi(t + r)^{K-1}\,dt` (:func:`mixture_bayes_accuracy`).
  The spread of scales is what real features have: SGD learns the weights of the small-scale
  features slowly, and the last points of accuracy, where the gradient noise scale is large,
  take the longest (``docs/results/critical_batch.md``: with tuned momentum the critical batch
  is about 700 at a target of 0.85 and 4,400 at 0.90).
* ``teacher-mlp``: inputs N(0, I), labels drawn from the softmax of a fixed random teacher MLP
  (one hidden ReLU layer) at a temperature that leaves labels noisy; the student is a wider
  MLP of the same shape, so it can represent the teacher and the problem is nonconvex. The
  Bayes-optimal accuracy is the teacher's expected max class probability, measured exactly on
  the test inputs (:attr:`TeacherMLP.bayes_accuracy`, 0.877); the critical batch is about
  2,500 at a target of 0.85.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from adasum.lab.task import DATA_SEED, Task, TaskError

__all__ = ["STREAM_TASKS", "stream_task", "stream_normals", "mixture_bayes_accuracy",
           "GaussianMixture", "TeacherMLP", "TEST_SIZE"]

#: The streams of fresh generated examples.
STREAM_TASKS = ("gauss-logistic", "teacher-mlp")
DEFAULT_SAMPLES = 1 << 22
TEST_SIZE = 1 << 15
_EVAL_BATCH = 8192
#: gauss-logistic: classes, input dimension, the means' length (Bayes accuracy 0.9025) and the
#: ratio of the largest input scale to the smallest.
MIXTURE: dict[str, Any] = {"classes": 10, "dim": 64, "radius": 3.0, "spread": 10.0}
#: teacher-mlp: input dimension, teacher and student hidden widths, classes, and the factor on
#: the teacher's logits (it sets how noisy the labels are).
TEACHER: dict[str, Any] = {"dim": 16, "hidden": 16, "student": 64, "classes": 10, "sharpness": 12.0}


# ------------------------------------------------------------------------- the generator

def _hash32(key: np.ndarray) -> np.ndarray:
    """A bijective mix of uint32 keys (a Weyl step, then the "lowbias32" finaliser); uint32
    arithmetic wraps by definition, which is why this runs in numpy rather than torch."""
    x = key * np.uint32(0x9E3779B9)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _uniform(key: np.ndarray) -> np.ndarray:
    """Float32 in (0, 1) from the top 24 bits of the hash (all float32 holds exactly): never 0,
    so the logarithm of Box-Muller stays finite."""
    return (_hash32(key) >> np.uint32(8)).astype(np.float32) * np.float32(2**-24) + np.float32(2**-25)


def stream_normals(index: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``([n, dim] standard normals, [n] uniforms)`` of examples ``index`` (int64 ``[n]``), each
    a function of its index alone. ``dim`` must be even: Box-Muller makes normals in pairs."""
    base = index.astype(np.uint32)[:, None] * np.uint32(dim + 1)
    half = np.arange(0, dim, 2, dtype=np.uint32)
    u1, u2 = _uniform(base + half), _uniform(base + half + np.uint32(1))
    radius = np.sqrt(np.float32(-2) * np.log(u1))
    angle = np.float32(2 * np.pi) * u2
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return normals, _uniform(base[:, 0] + np.uint32(dim))


def _capacity(dim: int) -> int:
    """Examples the 32-bit key space holds at ``dim`` inputs."""
    return 2**32 // (dim + 1)


# ------------------------------------------------------------------------------ the tasks

@dataclass(frozen=True, eq=False)
class _Stream(Task):
    """Examples made on demand; subclasses say how normals and a uniform become ``(x, y)``."""

    name: str
    samples: int
    dim: int
    x_test: torch.Tensor
    y_test: torch.Tensor

    kind = "classification"

    @property
    def train_size(self) -> int:
        return self.samples

    def examples(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normals, uniform = stream_normals(index.reshape(-1).cpu().numpy(), self.dim)
        device = self.x_test.device
        x, y = self.label(torch.from_numpy(normals).to(device), torch.from_numpy(uniform).to(device))
        return x.view(*index.shape, self.dim), y.view(index.shape)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(self.x_test.split(_EVAL_BATCH), self.y_test.split(_EVAL_BATCH))

    @abstractmethod
    def label(self, normals: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of examples from their ``[n, dim]`` normals and ``[n]`` uniforms."""

    def _moved(self: _S, device: torch.device, fields: tuple[str, ...]) -> _S:
        if self.x_test.device == device:
            return self
        return replace(self, **{k: getattr(self, k).to(device) for k in ("x_test", "y_test", *fields)})


_S = TypeVar("_S", bound=_Stream)


@dataclass(frozen=True, eq=False, kw_only=True)
class GaussianMixture(_Stream):
    """``gauss-logistic``: ``means`` ``[classes, dim]``, orthogonal, of length ``radius``, in
    the coordinates that ``scales`` ``[dim]`` stretch into the inputs."""

    means: torch.Tensor
    radius: float
    scales: torch.Tensor

    def label(self, normals, uniform):
        y = (uniform * len(self.means)).long().clamp_max(len(self.means) - 1)
        return (normals + self.means[y]) * self.scales, y

    @property
    def bayes_accuracy(self) -> float:
        return mixture_bayes_accuracy(self.radius, len(self.means))

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(self.dim, len(self.means))

    def to(self, device: torch.device) -> GaussianMixture:
        return self._moved(device, ("means", "scales"))


@dataclass(frozen=True, eq=False, kw_only=True)
class TeacherMLP(_Stream):
    """``teacher-mlp``: the ``teacher`` network's logits (times its sharpness) are the true
    log-odds of the labels."""

    teacher: nn.Module

    def label(self, normals, uniform):
        with torch.no_grad():
            p = self.teacher(normals).softmax(-1)
        # Inverse-CDF sampling with the example's own uniform: the label is reproducible.
        y = (p.cumsum(-1) < uniform[:, None]).sum(-1).clamp_max(p.shape[-1] - 1)
        return normals, y

    @property
    def bayes_accuracy(self) -> float:
        """The expected accuracy of the teacher's argmax on the test inputs: the mean of their
        largest class probability (exact for these inputs, whatever labels were drawn)."""
        with torch.no_grad():
            return self.teacher(self.x_test).softmax(-1).max(-1).values.double().mean().item()

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _mlp(self.dim, TEACHER["student"], TEACHER["classes"])

    def to(self, device: torch.device) -> TeacherMLP:
        if self.x_test.device == device:
            return self
        # A copy: Module.to moves in place, and this task must stay where it is.
        return replace(self._moved(device, ()), teacher=copy.deepcopy(self.teacher).to(device))


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


def mixture_bayes_accuracy(radius: float, classes: int) -> float:
    """Bayes-optimal accuracy of equally likely classes N(mu_k, I) with orthogonal means of
    length ``radius``: the true class wins when its coordinate along its own mean, radius + t,
    beats every other class's, s_k, all standard normal: integral of phi(t) Phi(t + r)^(K-1)."""
    t = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    density = torch.exp(-t * t / 2) / math.sqrt(2 * torch.pi)
    return torch.trapezoid(density * torch.special.ndtr(t + radius) ** (classes - 1), t).item()


def _test_set(task: _Stream) -> _Stream:
    """The task with its test set: the last TEST_SIZE examples of the key space."""
    first = _capacity(task.dim) - TEST_SIZE
    x, y = task.examples(torch.arange(first, first + TEST_SIZE))
    return replace(task, x_test=x, y_test=y)


def stream_task(name: str, samples: int | None = None) -> _Stream:
    """Task ``name`` of :data:`STREAM_TASKS` with ``samples`` training examples (default
    :data:`DEFAULT_SAMPLES`); TaskError when they would reach the test set's keys."""
    samples = samples or DEFAULT_SAMPLES
    spec = MIXTURE if name == "gauss-logistic" else TEACHER
    limit = _capacity(spec["dim"]) - TEST_SIZE
    if samples > limit:
        raise TaskError(f"--samples of task {name!r} can be at most {limit} (the generator's key space)")
    g = torch.Generator().manual_seed(DATA_SEED)
    empty = torch.empty(0)
    task: _Stream
    if name == "gauss-logistic":
        directions, _ = torch.linalg.qr(torch.randn(spec["dim"], spec["classes"], generator=g))
        means = spec["radius"] * directions.T.contiguous()
        scales = torch.logspace(0, -math.log10(spec["spread"]), spec["dim"])
        task = GaussianMixture(name, samples, spec["dim"], empty, empty, means=means, radius=spec["radius"],
                               scales=scales)
    else:
        task = TeacherMLP(name, samples, spec["dim"], empty, empty, teacher=_teacher(g))
    return _test_set(task)


def _teacher(g: torch.Generator) -> nn.Module:
    """The fixed teacher: He-initialised weights drawn from the data seed, zero biases, the
    output scaled by the sharpness."""
    t = TEACHER
    teacher = _mlp(t["dim"], t["hidden"], t["classes"])
    with torch.no_grad():
        first, last = cast(nn.Linear, teacher[0]), cast(nn.Linear, teacher[2])
        for layer, fan_in, gain in ((first, t["dim"], 2.0), (last, t["hidden"], 1.0)):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * math.sqrt(gain / fan_in))
            layer.bias.zero_()
        last.weight.mul_(t["sharpness"])
    return teacher.requires_grad_(False)
