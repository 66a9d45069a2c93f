"""``adasum simulate``: data-parallel training with N simulated workers in one process.

The workers share one model. Each step, ``torch.func.vmap`` takes every worker's gradient over
its own examples in one batched call; the gradients (gradient mode) or the per-worker optimizer
deltas (delta mode, each worker with its own optimizer state) are reduced by the run's
reducer (Adasum, the average or the sum). Data order, learning-rate schedule and evaluation
points are those of ``adasum train`` (:class:`~adasum.lab.config.Plan`), so a simulated run
follows the real one to float tolerance.

At every evaluation point the simulator also measures how far each reducer's update is from
the update sequential SGD would make over the same examples: starting from the current
weights, worker 0's examples, then worker 1's at the new weights, and so on, each a plain SGD
step at the current learning rate. The distance is relative, ``|c - s| / |s|``, over all layers.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, grad, grad_and_value, vmap
from tqdm import tqdm

import adasum
from adasum.lab.config import DELTA_MODE, REDUCERS, Plan, RunConfig, make_reducer
from adasum.lab.optimizers import make_optimizer, set_lr
from adasum.lab.records import evaluate, summarize
from adasum.lab.tasks import Task
from adasum.optim import local_delta

__all__ = ["reduce_stacked", "simulate_run", "sweep", "geometry"]


def reduce_stacked(stacked: Sequence[torch.Tensor], reducer: adasum.Reducer) -> list[torch.Tensor]:
    """Reduce ``[workers, ...]`` tensors (one per layer, as vmap returns them) over the worker
    dimension: what ``reducer.all_reduce`` would give every rank of a real run."""
    return reducer.reduce([[t[r] for t in stacked] for r in range(stacked[0].shape[0])])


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))


class _Workers:
    """Per-worker gradients of one shared model, taken in one vmap call."""

    def __init__(self, task: Task, model: torch.nn.Module) -> None:
        self.task, self.model = task, model
        self.names = [n for n, _ in model.named_parameters()]

        def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return task.loss(functional_call(model, params, (x,)), y)

        self._loss = loss
        self._batched = vmap(grad_and_value(loss), in_dims=(None, 0, 0))

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([workers, *shape] per layer, [workers] losses)`` at the current weights."""
        grads, losses = self._batched(self.params(), x, y)
        return [grads[n] for n in self.names], losses

    def sequential_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """What plain SGD would change, taking the workers' batches one after the other."""
        start = self.params()
        w = dict(start)
        for i in range(x.shape[0]):
            g = grad(self._loss)(w, x[i], y[i])
            w = {n: w[n] - lr * g[n] for n in self.names}
        return [w[n] - start[n] for n in self.names]


def _sequential_distances(workers: _Workers, reducers: dict[str, adasum.Reducer],
                          grads: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          lr: float) -> dict[str, float]:
    """Relative distance of each reducer's SGD update to the sequential one, and how much
    longer Adasum's update is than the average's (1 = average, workers = sum)."""
    seq = workers.sequential_update(x, y, lr)
    seq_norm = _norm(seq)
    row = {}
    reduced = {name: reduce_stacked(grads, reducer) for name, reducer in reducers.items()}
    for name, update in reduced.items():
        row[f"dist_{name}"] = _norm([-lr * u - s for u, s in zip(update, seq)]) / max(seq_norm, 1e-300)
    row["adasum_scale"] = _norm(reduced["adasum"]) / max(_norm(reduced["average"]), 1e-300)
    return row


def simulate_run(task: Task, config: RunConfig, workers: int, *, distances: bool = True,
                 progress: bool = False) -> tuple[list[dict], dict]:
    """Train ``config`` with ``workers`` simulated workers; returns ``(history, summary)``.

    ``history`` has one row per step (as ``adasum train`` writes it); rows at evaluation
    points add the test score and, with ``distances``, the distances to sequential SGD.
    """
    plan = Plan(config.validated(), workers, len(task.x_train))
    # Every reducer, for the distances; the run itself steps with its own.
    reducers = {name: make_reducer(name) for name in REDUCERS}
    reducer = reducers[config.reducer]
    model = task.build_model(config.seed)
    sim = _Workers(task, model)
    params = list(model.parameters())
    delta = config.optimizer in DELTA_MODE
    if delta:
        # Each worker steps its own copy of the weights with its own optimizer state.
        copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(workers)]
        optimizers = [make_optimizer(config.optimizer, c, config.lr) for c in copies]
    else:
        optimizers = [make_optimizer(config.optimizer, params, config.lr)]
    history: list[dict] = []
    started = time.perf_counter()
    for step, examples in tqdm(plan.batches(), total=plan.total_steps, disable=not progress,
                               leave=False, unit="step"):
        lr = plan.lr_at(step)
        for opt in optimizers:
            set_lr(opt, lr)
        idx = examples.view(workers, plan.per_worker)
        x, y = task.x_train[idx], task.y_train[idx]
        grads, losses = sim.gradients(x, y)
        row = {"step": step + 1, "epoch": plan.epoch_of(step + 1), "lr": lr, "loss": losses.mean().item()}
        evaluating = plan.evaluates_after(step + 1)
        if evaluating and distances:
            row.update(_sequential_distances(sim, reducers, grads, x, y, lr))
        if delta:
            _delta_step(params, copies, optimizers, grads, reducer)
        else:
            for p, g in zip(params, reduce_stacked(grads, reducer)):
                p.grad = g
            optimizers[0].step()
        if evaluating:
            row.update(evaluate(task, model))
        history.append(row)
        if not math.isfinite(row["loss"]):
            break
    summary = summarize(history, plan)
    measured = [r for r in history if "dist_adasum" in r]
    for key in ("dist_adasum", "dist_average", "dist_sum", "adasum_scale"):
        summary[key] = sum(r[key] for r in measured) / len(measured) if measured else math.nan
    summary["seconds"] = time.perf_counter() - started
    return history, summary


def _delta_step(params: list[torch.nn.Parameter], copies: list[list[torch.nn.Parameter]],
                optimizers: list[torch.optim.Optimizer], grads: list[torch.Tensor],
                reducer: adasum.Reducer) -> None:
    """Every worker steps its own optimizer from the shared weights and keeps the delta, as
    each rank of :class:`adasum.optim.DistributedOptimizer` does (:func:`adasum.optim.local_delta`);
    the shared weights move by the reduced deltas."""
    start = [p.detach() for p in params]
    for r, (copy, opt) in enumerate(zip(copies, optimizers)):
        with torch.no_grad():
            for c, p, g in zip(copy, start, grads):
                c.copy_(p)
                c.grad = g[r]
        local_delta(opt, copy, start)
    deltas = reducer.reduce([[c.detach() for c in copy] for copy in copies])
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)


def sweep(task: Task, base: RunConfig, *, workers: Sequence[int], reducers: Sequence[str],
          optimizers: Sequence[str], lrs: Sequence[float], batches: Sequence[int],
          accums: Sequence[int], distances: bool = True,
          on_run: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict]]:
    """One run per point of the grid the given values span; returns ``(summaries, curves)``
    where each curve row is a history row tagged with its run's index. Settings whose step would
    need more examples than the training set holds are skipped."""
    summaries, curves = [], []
    grid = itertools.product(optimizers, batches, accums, workers, reducers, lrs)
    for optimizer, batch, accum, n, reducer, lr in grid:
        if n * batch * accum > len(task.x_train):
            continue
        config = base.with_(optimizer=optimizer, batch=batch, accum=accum, reducer=reducer, lr=lr)
        history, summary = simulate_run(task, config, n, distances=distances)
        summary["run"] = len(summaries)
        summaries.append(summary)
        curves.extend({"run": summary["run"], **r} for r in history)
        if on_run is not None:
            on_run(summary)
    return summaries, curves


def geometry(workers: Sequence[int], cosines: Sequence[float], dim: int = 4096,
             seed: int = 0) -> list[dict]:
    """Adasum of N unit vectors whose pairwise cosine is ``c``: its length relative to the sum
    and to the average. Orthogonal vectors (c = 0) should give the sum, equal ones the average.

    The vectors are ``sqrt(c) u + sqrt(1 - c) e_i`` with u a shared unit vector and e_i
    orthonormal noise directions, so every pair has cosine exactly c.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in workers:
        basis, _ = torch.linalg.qr(torch.randn(dim, n + 1, generator=g, dtype=torch.float64))
        shared, noise = basis[:, 0], basis[:, 1:].T
        for c in cosines:
            vectors = math.sqrt(c) * shared + math.sqrt(1 - c) * noise
            a = adasum.Adasum().reduce(list(vectors))
            total, mean = vectors.sum(0), vectors.mean(0)
            rows.append({
                "workers": n, "cosine": c,
                "dist_to_sum": ((a - total).norm() / total.norm()).item(),
                "dist_to_average": ((a - mean).norm() / mean.norm()).item(),
                "norm_over_average": (a.norm() / mean.norm()).item(),
            })
    return rows
