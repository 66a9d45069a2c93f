"""The trained state of a simulated run (:mod:`adasum.lab.simulate`): the shared model and the
optimizer state, how one step moves them, and the checkpoint they can be saved to and resumed
from, with the same or another number of workers (elastic training)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

import adasum
from adasum.lab.config import RunConfig
from adasum.lab.optimizers import make_optimizer
from adasum.optim import local_delta

__all__ = ["Replicas", "per_rank", "local_deltas"]


def per_rank(stacked: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``[workers, ...]`` tensors as each worker's list of tensors."""
    return [[t[r] for t in stacked] for r in range(stacked[0].shape[0])]


class Replicas:
    """The trained state of a simulated run: the shared model and the optimizer state. In
    gradient mode one optimizer steps the shared weights; in delta mode every worker has its
    own optimizer (and its own moments) over a copy of the weights."""

    def __init__(self, model: torch.nn.Module, config: RunConfig) -> None:
        self.model, self.config = model, config
        self.params = list(model.parameters())
        self.delta = config.reduces_deltas
        self.copies: list[list[torch.nn.Parameter]] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        if not self.delta:
            self.optimizers = [make_optimizer(config.optimizer, self.params, config.lr)]

    def resize(self, workers: int) -> None:
        """Delta mode: ``workers`` per-worker optimizers. Worker r of the new count takes the
        state of old worker ``r mod old count``, as a restarted rank that loads a rank's saved
        moments would (a fresh run: fresh state)."""
        if not self.delta or len(self.optimizers) == workers:
            return
        old = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        self.copies = [[torch.nn.Parameter(p.detach().clone()) for p in self.params] for _ in range(workers)]
        self.optimizers = [make_optimizer(self.config.optimizer, c, self.config.lr) for c in self.copies]
        if old:
            for r, opt in enumerate(self.optimizers):
                opt.load_state_dict(old[r % len(old)])

    def checkpoint(self, epoch: int, steps: int) -> dict:
        """What ``resume`` continues from: copies, not views of the live state."""
        return {"epoch": epoch, "steps": steps, "model": copy.deepcopy(self.model.state_dict()),
                "optimizers": [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]}

    def load(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.resize(len(checkpoint["optimizers"]))
        for opt, state in zip(self.optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(copy.deepcopy(state))

    def step(self, grads: list[torch.Tensor], reducer: adasum.Reducer) -> list[list[torch.Tensor]]:
        """One training step from the stacked per-worker gradients; returns the per-worker
        vectors that were reduced (gradients, or deltas in delta mode)."""
        if not self.delta:
            vectors = per_rank(grads)
            for p, g in zip(self.params, reducer.reduce(vectors)):
                p.grad = g
            self.optimizers[0].step()
            return vectors
        deltas = local_deltas(self.params, self.copies, self.optimizers, grads)
        with torch.no_grad():
            for p, d in zip(self.params, reducer.reduce(deltas)):
                p.add_(d)
        return deltas


def local_deltas(params: list[torch.nn.Parameter], copies: list[list[torch.nn.Parameter]],
                  optimizers: list[torch.optim.Optimizer], grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every worker steps its own optimizer from the shared weights and keeps the delta, as
    each rank of :class:`adasum.optim.DistributedOptimizer` does (:func:`adasum.optim.local_delta`);
    the shared weights are then moved by the reduced deltas."""
    start = [p.detach() for p in params]
    for r, (copy_, opt) in enumerate(zip(copies, optimizers)):
        with torch.no_grad():
            for c, p, g in zip(copy_, start, grads):
                c.copy_(p)
                c.grad = g[r]
        local_delta(opt, copy_, start)
    return [[c.detach() for c in copy_] for copy_ in copies]
