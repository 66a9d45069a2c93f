"""The interface every task of the lab offers its trainers: :class:`Task`.

The trainers see a task only through it: a training set of ``train_size`` examples addressed
by index (the step plan draws the indices), a test set in batches, the model, its loss and its
score. Examples may be made on demand (windows of a byte stream, augmented images), so a
training set need not be one tensor. The score is test accuracy for classification (next-byte
accuracy for the language model) and R^2 for regression; both are at most 1, which is what
makes a target above 1 unreachable. The tasks themselves, and the registry that builds one by
name, are in :mod:`adasum.lab.tasks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Task", "TaskError", "DATA_SEED", "METRICS"]

#: The split and the synthetic teachers use this seed, not the run's: the data stay fixed
#: while the seed varies the model's initialisation and the data order.
DATA_SEED = 12345


#: What the score of each kind of task is, as the program's output names it.
METRICS = {"classification": "test accuracy", "regression": "test R^2", "language": "next-byte accuracy",
           "quadratic": "share of the initial loss removed"}


class TaskError(ValueError):
    """The task cannot be built from what the user gave (unknown name, bad data file)."""


class Task(ABC):
    """What a trainer needs of a task. ``kind`` is ``"classification"`` (the loss is
    cross-entropy over the last dimension of the output, whatever the dimensions before it),
    ``"regression"``, ``"language"`` (classification of the next byte, whose evaluation also
    reports bits per byte) or ``"quadratic"`` (the noisy quadratic model, which brings its own
    loss and score: :mod:`adasum.lab.quadratic`)."""

    name: str
    kind: str

    @property
    @abstractmethod
    def train_size(self) -> int:
        """How many training examples the step plan draws indices from."""

    @abstractmethod
    def examples(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of training examples ``index`` (any shape; the outputs have it
        as their leading dimensions), on the task's device."""

    @abstractmethod
    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test (validation) set in batches small enough to run forward at once."""

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """The model at its initialisation for ``seed`` (identical on every worker), on the CPU."""

    @abstractmethod
    def to(self, device: torch.device) -> Task:
        """The same task with its data on ``device`` (self if they are there already)."""

    @property
    def metric(self) -> str:
        """What :meth:`score` measures, in words: "test accuracy", "test R^2" or "next-byte accuracy"."""
        return METRICS[self.kind]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over a batch: cross-entropy or mean squared error."""
        if self.kind == "regression":
            return F.mse_loss(output.squeeze(-1), target)
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def score(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """Accuracy (classification) or R^2 (regression) of ``output`` against ``target``."""
        if self.kind != "regression":
            return (output.argmax(-1) == target).double().mean().item()
        residual = ((output.squeeze(-1) - target) ** 2).sum()
        total = ((target - target.mean()) ** 2).sum().clamp_min(1e-30)
        return (1.0 - residual / total).item()
