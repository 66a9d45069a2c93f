"""The trained state of a simulated run (:mod:`adasum.lab.simulate`): the shared model and the
optimizer state, how one step moves them, and the checkpoint they can be saved to and resumed
from, with the same or another number of workers (elastic training).

Local SGD (``config.local``, as :class:`adasum.optim.LocalSGD` on real ranks): every worker
keeps its own weights between synchronisations and steps its own optimizer on them; every
``sync_every`` steps the deltas from the shared (last synchronised) weights are reduced and the
shared weights move by the result, or by the outer optimizer's step on its negation, and every
worker takes them."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

import adasum
from adasum.lab.config import RunConfig
from adasum.lab.optimizers import make_optimizer, make_outer
from adasum.optim import local_delta, rank_state

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
        self.delta, self.local = config.reduces_deltas, config.local
        self.copies: list[list[torch.nn.Parameter]] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        if not self.delta:
            self.optimizers = [make_optimizer(config.optimizer, self.params, config.lr)]
        self.outer = make_outer(config.outer, self.params, config.outer_lr) if config.outer else None
        self.since_sync = 0  # local SGD: steps since the last synchronisation
        self.last_deltas: list[list[torch.Tensor]] | None = None  # local SGD: the last ones reduced

    def resize(self, workers: int) -> None:
        """Delta mode: ``workers`` per-worker optimizers. Worker r of the new count takes the
        state of old worker ``r mod old count`` (with local SGD, its weights too;
        :func:`adasum.optim.rank_state`), as a restarted rank that loads a rank's saved files
        would (a fresh run: fresh state)."""
        if not self.delta or len(self.optimizers) == workers:
            return
        old = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        sources = self.copies if self.local and self.copies else [self.params]
        self.copies = [[torch.nn.Parameter(p.detach().clone()) for p in rank_state(sources, r)]
                       for r in range(workers)]
        self.optimizers = [make_optimizer(self.config.optimizer, c, self.config.lr) for c in self.copies]
        if old:
            for r, opt in enumerate(self.optimizers):
                opt.load_state_dict(copy.deepcopy(rank_state(old, r)))

    def checkpoint(self, epoch: int, steps: int) -> dict:
        """What ``resume`` continues from: copies, not views of the live state."""
        saved = {"epoch": epoch, "steps": steps, "model": copy.deepcopy(self.model.state_dict()),
                 "optimizers": [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]}
        if self.local:
            saved.update(copies=[[c.detach().clone() for c in copy_] for copy_ in self.copies],
                         outer=copy.deepcopy(self.outer.state_dict()) if self.outer else None,
                         since_sync=self.since_sync)
        return saved

    def load(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        if self.local:
            self.copies = [[torch.nn.Parameter(t.clone()) for t in copy_] for copy_ in checkpoint["copies"]]
            self.since_sync = checkpoint["since_sync"]
            if self.outer is not None:
                self.outer.load_state_dict(copy.deepcopy(checkpoint["outer"]))
        self.resize(len(checkpoint["optimizers"]))
        for opt, state in zip(self.optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(copy.deepcopy(state))

    def stacked(self) -> list[torch.Tensor] | None:
        """Local SGD: ``[workers, ...]`` per layer, every worker's own weights (None otherwise:
        the workers share the model's)."""
        if not self.local:
            return None
        with torch.no_grad():
            return [torch.stack(layer) for layer in zip(*self.copies)]

    def step(self, grads: list[torch.Tensor], reducer: adasum.Reducer) -> list[list[torch.Tensor]] | None:
        """One training step from the stacked per-worker gradients; returns the per-worker
        vectors that were reduced (gradients, or deltas in delta mode; with local SGD those of
        the last synchronisation, None before the first)."""
        if not self.delta:
            vectors = per_rank(grads)
            for p, g in zip(self.params, reducer.reduce(vectors)):
                p.grad = g
            self.optimizers[0].step()
            return vectors
        if self.local:
            return self._local_step(grads, reducer)
        deltas = local_deltas(self.params, self.copies, self.optimizers, grads)
        with torch.no_grad():
            for p, d in zip(self.params, reducer.reduce(deltas)):
                p.add_(d)
        return deltas

    def _local_step(self, grads: list[torch.Tensor], reducer: adasum.Reducer) -> list[list[torch.Tensor]] | None:
        """Every worker steps on its own weights; every ``sync_every``-th step synchronises.
        Returns the deltas of the last synchronisation (None before the first)."""
        for r, (copy_, opt) in enumerate(zip(self.copies, self.optimizers)):
            for c, g in zip(copy_, grads):
                c.grad = g[r]
            opt.step()
        self.since_sync += 1
        if self.since_sync < self.config.sync_every:
            return self.last_deltas
        self.since_sync = 0
        with torch.no_grad():
            deltas = [[c.detach() - p.detach() for c, p in zip(copy_, self.params)] for copy_ in self.copies]
        combined = reducer.reduce(deltas)
        if self.outer is None:
            with torch.no_grad():
                for p, d in zip(self.params, combined):
                    p.add_(d)
        else:
            for p, d in zip(self.params, combined):
                p.grad = -d
            self.outer.step()
        with torch.no_grad():
            for copy_ in self.copies:
                for c, p in zip(copy_, self.params):
                    c.copy_(p)
        self.last_deltas = deltas
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
