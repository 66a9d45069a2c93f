"""``adasum simulate``: data-parallel training with N simulated workers in one process.

The workers share one model. Each step, ``torch.func.vmap`` takes every worker's gradient over
its own examples in one batched call; the gradients (gradient mode) or the per-worker optimizer
deltas (delta mode, each worker with its own optimizer state) are reduced by the run's
reducer (Adasum, the average or the sum). Data order, learning-rate schedule and evaluation
points are those of ``adasum train`` (:class:`~adasum.lab.config.Steps`), so a simulated run
follows the real one to float tolerance.

Every step with two or more workers also feeds the gradient noise scale (:class:`adasum.NoiseScale`,
McCandlish et al. 2018) of the workers' gradients, at one worker's batch and all workers'
batch, into a smoothed estimate (:class:`adasum.RunningNoiseScale`); evaluation rows carry it as
``noise_scale`` (B_simple in examples), as in ``adasum train``.

At every evaluation point the simulator also measures how far each reducer's update is from
the update sequential SGD would make over the same examples: starting from the current
weights, worker 0's examples, then worker 1's at the new weights, and so on, each a plain SGD
step at the current learning rate. The distance is relative, ``|c - s| / |s|``, over all layers.

With local SGD (``--sync-every``, ``--outer-optimizer``: :mod:`adasum.lab.replicas`) every
worker's gradient is taken at its own weights, and the distances to sequential SGD and the
noise scale, which need gradients at one point, are not measured; the evaluations score the
shared weights of the last synchronisation.

The simulator runs on any device (``device``: the model, the data and the reductions live
there; :mod:`adasum.lab.device`). Its memory is bounded by taking the per-worker gradients
``worker_chunk`` workers at a time: a chunk's forward and backward activations are what grows
with the number of workers (the model's parameters are shared), and only the per-worker
gradients themselves, one model-sized tensor per worker, are kept for the reduction. By default
the chunk holds as many workers as fit in :func:`~adasum.lab.device.chunk_budget` bytes of
saved activations, measured on one worker's forward pass. Chunking changes the arithmetic at
most in the last bits. On the CPU, models of matrix products (the MLP, the transformer) give the
same bits in any chunking, because each worker's slice of a batched product is computed alone;
convolutions do not (under ``vmap`` a chunk's weight gradient is one grouped convolution,
blocked by the chunk size), and differ by about 1e-9 relative. On CUDA the libraries pick
kernels by problem size, so equality there is to float tolerance. ``tests/test_tasks.py`` checks both.
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
from adasum.lab.config import REDUCERS, ConfigError, RunConfig, Steps, make_reducer
from adasum.lab.device import StepClock, resolve_device, workers_per_chunk
from adasum.lab.optimizers import set_lr
from adasum.lab.records import crossing, evaluate, summarize
from adasum.lab.replicas import Replicas, per_rank
from adasum.lab.task import Task

__all__ = ["reduce_stacked", "SimulatedRun", "simulate_run", "sweep", "orthogonality", "gradient_noise"]


def reduce_stacked(stacked: Sequence[torch.Tensor], reducer: adasum.Reducer) -> list[torch.Tensor]:
    """Reduce ``[workers, ...]`` tensors (one per layer, as vmap returns them) over the worker
    dimension: what ``reducer.all_reduce`` would give every rank of a real run."""
    return reducer.reduce(per_rank(stacked))


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))


class _Workers:
    """Per-worker gradients of one shared model, taken ``chunk`` workers per vmap call."""

    def __init__(self, task: Task, model: torch.nn.Module, chunk: int) -> None:
        self.task, self.model, self.chunk = task, model, chunk
        self.names = [n for n, _ in model.named_parameters()]

        def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return task.loss(functional_call(model, params, (x,)), y)

        self._loss = loss
        self._batched = vmap(grad_and_value(loss), in_dims=(None, 0, 0))
        self._own = vmap(grad_and_value(loss), in_dims=(0, 0, 0))  # every worker its own weights

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def gradients(self, x: torch.Tensor, y: torch.Tensor,
                  own: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([workers, *shape] per layer, [workers] losses)`` at the current weights, or at
        every worker's own (``own``: ``[workers, *shape]`` per layer)."""
        params, workers = self.params(), x.shape[0]
        weights = params if own is None else dict(zip(self.names, own))
        batched = self._batched if own is None else self._own
        if self.chunk >= workers:
            grads, losses = batched(weights, x, y)
            return [grads[n] for n in self.names], losses
        # Each chunk's gradients are copied into place at once, so a chunk's activations and
        # gradients are freed before the next chunk runs.
        stacked = [p.new_empty(workers, *p.shape) for p in params.values()]
        losses = x.new_empty(workers, dtype=stacked[0].dtype)
        for start in range(0, workers, self.chunk):
            part = slice(start, start + self.chunk)
            mine = weights if own is None else {n: w[part] for n, w in weights.items()}
            grads, losses[part] = batched(mine, x[part], y[part])
            for out, n in zip(stacked, self.names):
                out[part] = grads[n]
        return stacked, losses

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


def _phases(config: RunConfig, workers: int, train_size: int, resize: tuple[int, int] | None,
            first: int) -> list[tuple[Steps, int, int]]:
    """``(plan, first epoch, end epoch)`` of each stretch of a run with a fixed worker count."""
    plan = Steps(config, workers, train_size)
    if first >= config.epochs:
        raise ConfigError(f"the checkpoint is at epoch {first}: nothing is left of {config.epochs} epochs")
    if resize is None:
        return [(plan, first, config.epochs)]
    epoch, after = resize
    if not first < epoch < config.epochs:
        raise ConfigError(f"the worker count can change only between epochs {first + 1} and "
                          f"{config.epochs - 1}, not at epoch {epoch}")
    if after < 1:
        raise ConfigError(f"the new worker count must be at least 1, got {after}")
    return [(plan, first, epoch), (Steps(config, after, train_size), epoch, config.epochs)]


class SimulatedRun:
    """One simulated run, in named phases: the constructor sets it up (the stretches of fixed
    worker count, the model and every worker's optimizer on the device, the chunk of workers
    per gradient call), :meth:`train` runs the step loop (:meth:`_step`: the workers'
    gradients, the reduction and the update, with the distances to sequential SGD and the
    evaluation (:meth:`_evaluate`) at the evaluation points), and :meth:`summary` reads the
    run's one line from what the loop measured. The arguments are :func:`simulate_run`'s."""

    def __init__(self, task: Task, config: RunConfig, workers: int, *, distances: bool = True,
                 device: str | torch.device = "cpu", worker_chunk: int | None = None,
                 resize: tuple[int, int] | None = None, resume: dict | None = None,
                 diagnostics: bool = False, stop_at_target: bool = False) -> None:
        self.device = resolve_device(device)
        self.config, self.workers, self.resize, self.resumed = config, workers, resize, resume is not None
        self.distances, self.diagnostics, self.stop_at_target = distances, diagnostics, stop_at_target
        first = resume["epoch"] if resume is not None else 0
        self.phases = _phases(config.validated(), workers, task.train_size, resize, first)
        self.task = task.to(self.device)
        # Every reducer, for the distances; the run itself steps with its own.
        self.reducers = {name: make_reducer(name) for name in REDUCERS}
        self.replicas = Replicas(self.task.build_model(config.seed).to(self.device), config)
        if resume is not None:
            self.replicas.load(resume)
        self.chunk = workers_per_chunk(worker_chunk, self.task, self.replicas.model, self.phases[0][0].per_worker,
                                       self.device)
        self.sim = _Workers(self.task, self.replicas.model, self.chunk)
        self.history: list[dict] = []
        self.noise = adasum.RunningNoiseScale()
        self.done = resume["steps"] if resume is not None else 0
        self.seconds = math.nan
        self.clock = StepClock(self.device)

    def train(self, *, progress: bool = False, on_epoch: Callable[[dict], None] | None = None) -> None:
        """The step loop, timed: ``progress`` draws a bar; ``on_epoch`` gets a checkpoint after
        every epoch."""
        started = time.perf_counter()
        total = sum((end - begin) * plan.steps_per_epoch for plan, begin, end in self.phases)
        with tqdm(total=total, disable=not progress, leave=False, unit="step") as bar:
            self._loop(bar, on_epoch)
        self.seconds = time.perf_counter() - started

    def _loop(self, bar: tqdm, on_epoch: Callable[[dict], None] | None) -> None:
        """Every stretch's steps, at its worker count, until the last or until the run ends
        early (:meth:`_ends`)."""
        for plan, begin, end in self.phases:
            self.replicas.resize(plan.workers)
            spe = plan.steps_per_epoch
            for step, examples in itertools.islice(plan.batches(begin * spe), (end - begin) * spe):
                self.history.append(self._step(plan, step, examples))
                bar.update()
                if self._ends():
                    return
                if on_epoch is not None and (step + 1) % spe == 0:
                    on_epoch(self.replicas.checkpoint((step + 1) // spe, self.done))

    def _step(self, plan: Steps, step: int, examples: torch.Tensor) -> dict:
        """Training step ``step`` of ``plan`` on ``examples``; returns its history row."""
        self.clock.start()
        lr = plan.lr_at(step)
        for opt in self.replicas.optimizers:
            set_lr(opt, lr)
        x, y = self.task.examples(examples.view(plan.workers, plan.per_worker))
        grads, losses = self.sim.gradients(x, y, self.replicas.stacked())
        if plan.workers > 1 and not self.replicas.local:
            self.noise.update(gradient_noise(grads, plan.per_worker))
        self.done += 1
        row = {"step": self.done, "epoch": plan.epoch_of(step + 1), "lr": lr, "loss": losses.mean().item()}
        evaluating = plan.evaluates_after(step + 1)
        if evaluating and self.distances and not self.replicas.local:
            with self.clock.paused():  # at the weights before the update: not part of the step
                row.update(_sequential_distances(self.sim, self.reducers, grads, x, y, lr))
        reduced = self.replicas.step(grads, self.reducers[self.config.reducer])
        self.clock.stop()
        if evaluating:
            row.update(self._evaluate(reduced))
        return row

    def _evaluate(self, reduced: list[list[torch.Tensor]] | None) -> dict:
        """The test score, the smoothed noise scale and, with ``diagnostics``, the orthogonality
        of the vectors the step reduced (``reduced``: None where it reduced none)."""
        row = {**evaluate(self.task, self.replicas.model), "noise_scale": self.noise.value}
        if self.diagnostics and reduced is not None:
            row.update(orthogonality(reduced, self.sim.names))
        return row

    def _ends(self) -> bool:
        """Whether the run stops after its last step: its loss is not finite, or it stops at the
        target and has reached it."""
        last = self.history[-1]
        if not math.isfinite(last["loss"]):
            return True
        return self.stop_at_target and "score" in last and _reached(self.history, self.config.target)

    def summary(self) -> dict:
        """The run's one line: :func:`~adasum.lab.records.summarize` of the history; for an
        elastic or resumed run the worker count it started with and the epoch of the change;
        the mean distances to sequential SGD over the evaluations that measured them; the wall
        time and :meth:`~adasum.lab.device.StepClock.seconds_per_step`; the device, the chunk
        and, on CUDA, the peak memory."""
        measured = [r for r in self.history if "dist_adasum" in r]
        elastic = self.resize is not None or self.resumed
        return {
            **summarize(self.history, self.phases[-1][0], self.task.metric),
            **({"workers_before": self.workers, "resize_epoch": self.resize[0] if self.resize else None}
               if elastic else {}),
            **{key: sum(r[key] for r in measured) / len(measured) if measured else math.nan
               for key in ("dist_adasum", "dist_average", "dist_sum", "adasum_scale")},
            "seconds": self.seconds,
            "seconds_per_step": self.clock.seconds_per_step(),
            "device": str(self.device),
            "worker_chunk": min(self.chunk, self.workers),
            **self.clock.peak(),
        }


def simulate_run(task: Task, config: RunConfig, workers: int, *, distances: bool = True,
                 progress: bool = False, device: str | torch.device = "cpu",
                 worker_chunk: int | None = None, resize: tuple[int, int] | None = None,
                 resume: dict | None = None, on_epoch: Callable[[dict], None] | None = None,
                 diagnostics: bool = False, stop_at_target: bool = False) -> tuple[list[dict], dict]:
    """Train ``config`` with ``workers`` simulated workers on ``device``, their gradients taken
    ``worker_chunk`` workers at a time (None: as many as :func:`~adasum.lab.device.chunk_budget`
    allows); returns ``(history, summary)``: :class:`SimulatedRun`'s phases in one call.

    ``history`` has one row per step (as ``adasum train`` writes it); rows at evaluation
    points add the test score and, with ``distances``, the distances to sequential SGD; with
    ``diagnostics``, how orthogonal the workers' reduced vectors (gradients, or deltas in delta
    mode, the last synchronisation's with local SGD) are, per layer and per level of Adasum's
    tree (:meth:`adasum.Stats.summary` under the prefix ``orth``: cosines, and the scaling
    1/2 = averaged, 1 = summed), whatever the run's reducer. The summary
    (:meth:`SimulatedRun.summary`) adds the device, the chunk and ``seconds_per_step``: the mean
    wall time of the training steps alone (gradients, reduction, update; no evaluations, no
    distances), the first step left out when there are others, since it pays the one-time costs
    (allocations, kernel selection, CUDA's start).

    Elastic training: ``resize=(epoch, n)`` continues the run with ``n`` workers from the
    start of epoch ``epoch`` on, with the same weights, optimizer state and learning rate, and
    the data order and schedule of an ``n``-worker run from that epoch: what checkpointing
    after ``epoch`` epochs and resuming with ``n`` workers does. ``on_epoch`` is given a
    checkpoint after every epoch; ``resume`` (such a checkpoint) continues from it with
    ``workers`` workers, the history holding the new steps only, numbered on from it.

    ``stop_at_target``: end the run once the target is reached (two consecutive evaluations at
    or above it, :func:`adasum.lab.records.crossing`). A study that measures steps to the target
    then pays for them alone, not for the rest of a budget sized for its largest E; the summary's
    final score is then the score at the crossing.
    """
    run = SimulatedRun(task, config, workers, distances=distances, device=device, worker_chunk=worker_chunk,
                       resize=resize, resume=resume, diagnostics=diagnostics, stop_at_target=stop_at_target)
    run.train(progress=progress, on_epoch=on_epoch)
    return run.history, run.summary()


def _reached(history: Sequence[dict], target: float | None) -> bool:
    """Whether the run has crossed ``target`` by the last two evaluations (no target: never)."""
    if target is None:
        return False
    last_two = list(itertools.islice((r for r in reversed(history) if "score" in r), 2))[::-1]
    return crossing(last_two, target) is not None


def gradient_noise(grads: Sequence[torch.Tensor], per_worker: int) -> adasum.NoiseScale:
    """The gradient noise scale of one step from the ``[workers, ...]`` gradients of workers
    that each average ``per_worker`` examples: the statistics of averaging them."""
    _, stats = adasum.Average().reduce(per_rank(grads), stats=True)
    return stats.noise_scale(per_worker)


def orthogonality(per_rank: Sequence[Sequence[torch.Tensor]], names: Sequence[str]) -> dict[str, float]:
    """How orthogonal the workers' vectors are, per layer (``orth/layer/NAME/cos`` and
    ``.../scale``), per level of Adasum's combination tree and overall: the statistics Adasum
    keeps of its pairwise combinations (:class:`adasum.Stats`). A scaling near 1/2 says Adasum
    averaged there, near 1 that it summed. Empty for one worker (nothing is combined)."""
    _, stats = adasum.Adasum().reduce(per_rank, stats=True)
    return stats.named(names).summary("orth")


def sweep(task: Task, base: RunConfig, *, workers: Sequence[int], reducers: Sequence[str],
          optimizers: Sequence[str], lrs: Sequence[float], batches: Sequence[int],
          accums: Sequence[int], distances: bool = True,
          on_run: Callable[[dict], None] | None = None, device: str | torch.device = "cpu",
          worker_chunk: int | None = None) -> tuple[list[dict], list[dict]]:
    """One run per point of the grid the given values span; returns ``(summaries, curves)``
    where each curve row is a history row tagged with its run's index. Settings whose step would
    need more examples than the training set holds are skipped. ``device`` and ``worker_chunk``
    are :func:`simulate_run`'s."""
    summaries: list[dict] = []
    curves: list[dict] = []
    task = task.to(resolve_device(device))  # once, not once per run
    grid = itertools.product(optimizers, batches, accums, workers, reducers, lrs)
    for optimizer, batch, accum, n, reducer, lr in grid:
        if n * batch * accum > task.train_size:
            continue
        config = base.with_(optimizer=optimizer, batch=batch, accum=accum, reducer=reducer, lr=lr)
        history, summary = simulate_run(task, config, n, distances=distances, device=device,
                                        worker_chunk=worker_chunk)
        summary["run"] = len(summaries)
        summaries.append(summary)
        curves.extend({"run": summary["run"], **r} for r in history)
        if on_run is not None:
            on_run(summary)
    return summaries, curves
