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
there). Its memory is bounded by taking the per-worker gradients ``worker_chunk`` workers at a
time: a chunk's forward and backward activations are what grows with the number of workers
(the model's parameters are shared), and only the per-worker gradients themselves, one
model-sized tensor per worker, are kept for the reduction. By default the chunk holds as many
workers as fit in :func:`chunk_budget` bytes of saved activations, measured on one worker's
forward pass. Chunking changes the arithmetic at most in the last bits. On the CPU, models of
matrix products (the MLP, the transformer) give the same bits in any chunking, because each
worker's slice of a batched product is computed alone; convolutions do not (under ``vmap`` a
chunk's weight gradient is one grouped convolution, blocked by the chunk size), and differ by
about 1e-9 relative. On CUDA the libraries pick kernels by problem size, so equality there is to
float tolerance. ``tests/test_tasks.py`` checks both.
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
from adasum.lab.optimizers import set_lr
from adasum.lab.records import crossing, evaluate, summarize
from adasum.lab.replicas import Replicas, per_rank
from adasum.lab.task import Task

__all__ = ["reduce_stacked", "simulate_run", "sweep", "geometry", "resolve_device",
           "activation_bytes", "chunk_budget", "orthogonality", "gradient_noise"]


def reduce_stacked(stacked: Sequence[torch.Tensor], reducer: adasum.Reducer) -> list[torch.Tensor]:
    """Reduce ``[workers, ...]`` tensors (one per layer, as vmap returns them) over the worker
    dimension: what ``reducer.all_reduce`` would give every rank of a real run."""
    return reducer.reduce(per_rank(stacked))


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has, or ConfigError saying why not."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: the simulator runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name!r}: this machine has no CUDA device "
                              "(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
        # Numbered, as tensors report it, so that a task already there is not copied again.
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    return device


def activation_bytes(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes one worker's forward pass on ``(x, y)`` keeps for its backward pass: what each
    further worker of a chunk adds to the peak memory."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task.loss(model(x), y)
    return total


def chunk_budget(device: torch.device) -> int:
    """Saved activations one chunk of workers may hold: 256 MiB on the CPU, an eighth of the
    GPU's memory on CUDA. A fixed figure, not the free memory of the moment, so that the same
    command chunks the same way every time. On the CPU small chunks are also the fast ones:
    their memory is reused from step to step, where a large chunk's is returned to the system
    and faulted in again (64 workers of the small transformer on 2 cores: 2.2 s per step in
    chunks of 4, 3.9 s in one chunk)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 8
    return 256 << 20


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


def simulate_run(task: Task, config: RunConfig, workers: int, *, distances: bool = True,
                 progress: bool = False, device: str | torch.device = "cpu",
                 worker_chunk: int | None = None, resize: tuple[int, int] | None = None,
                 resume: dict | None = None, on_epoch: Callable[[dict], None] | None = None,
                 diagnostics: bool = False, stop_at_target: bool = False) -> tuple[list[dict], dict]:
    """Train ``config`` with ``workers`` simulated workers on ``device``, their gradients taken
    ``worker_chunk`` workers at a time (None: as many as :func:`chunk_budget` allows); returns
    ``(history, summary)``.

    ``history`` has one row per step (as ``adasum train`` writes it); rows at evaluation
    points add the test score and, with ``distances``, the distances to sequential SGD; with
    ``diagnostics``, how orthogonal the workers' reduced vectors (gradients, or deltas in delta
    mode, the last synchronisation's with local SGD) are, per layer and per level of Adasum's
    tree (:meth:`adasum.Stats.summary` under the prefix ``orth``: cosines, and the scaling
    1/2 = averaged, 1 = summed), whatever the run's reducer. The summary adds the device, the
    chunk and ``seconds_per_step``: the mean wall time of the training steps alone (gradients,
    reduction, update; no evaluations, no distances), the first step left out when there are
    others, since it pays the one-time costs (allocations, kernel selection, CUDA's start).

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
    device = resolve_device(device)
    first = resume["epoch"] if resume is not None else 0
    phases = _phases(config.validated(), workers, task.train_size, resize, first)
    task = task.to(device)
    # Every reducer, for the distances; the run itself steps with its own.
    reducers = {name: make_reducer(name) for name in REDUCERS}
    reducer = reducers[config.reducer]
    replicas = Replicas(task.build_model(config.seed).to(device), config)
    if resume is not None:
        replicas.load(resume)
    if worker_chunk is not None and worker_chunk < 1:
        raise ConfigError(f"--worker-chunk must be at least 1, got {worker_chunk}")
    if worker_chunk is None:
        x, y = task.examples(torch.arange(phases[0][0].per_worker))
        worker_chunk = max(1, chunk_budget(device) // max(1, activation_bytes(task, replicas.model, x, y)))
    sim = _Workers(task, replicas.model, worker_chunk)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history: list[dict] = []
    noise = adasum.RunningNoiseScale()
    started, step_times = time.perf_counter(), []
    done = resume["steps"] if resume is not None else 0
    total = sum((end - begin) * plan.steps_per_epoch for plan, begin, end in phases)
    bar = tqdm(total=total, disable=not progress, leave=False, unit="step")
    for plan, begin, end in phases:
        replicas.resize(plan.workers)
        spe = plan.steps_per_epoch
        for step, examples in itertools.islice(plan.batches(begin * spe), (end - begin) * spe):
            began = time.perf_counter()
            lr = plan.lr_at(step)
            for opt in replicas.optimizers:
                set_lr(opt, lr)
            x, y = task.examples(examples.view(plan.workers, plan.per_worker))
            grads, losses = sim.gradients(x, y, replicas.stacked())
            if plan.workers > 1 and not replicas.local:
                noise.update(gradient_noise(grads, plan.per_worker))
            done += 1
            row = {"step": done, "epoch": plan.epoch_of(step + 1), "lr": lr, "loss": losses.mean().item()}
            evaluating = plan.evaluates_after(step + 1)
            if evaluating and distances and not replicas.local:
                paused = time.perf_counter()
                row.update(_sequential_distances(sim, reducers, grads, x, y, lr))
                began += time.perf_counter() - paused
            reduced = replicas.step(grads, reducer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the kernels queued by the step are part of it
            step_times.append(time.perf_counter() - began)
            if evaluating:
                row.update(evaluate(task, replicas.model), noise_scale=noise.value)
                if diagnostics and reduced is not None:
                    row.update(orthogonality(reduced, sim.names))
            history.append(row)
            bar.update()
            if not math.isfinite(row["loss"]):
                break
            if stop_at_target and evaluating and _reached(history, config.target):
                break
            if on_epoch is not None and (step + 1) % spe == 0:
                on_epoch(replicas.checkpoint((step + 1) // spe, done))
        if history and not math.isfinite(history[-1]["loss"]):
            break  # a diverged run stops in whichever stretch it diverged
        if stop_at_target and _reached(history, config.target):
            break
    bar.close()
    summary = summarize(history, phases[-1][0], task.metric)
    if resize is not None or resume is not None:
        # The step plan of one worker count does not count the steps of the other stretch.
        reached = summary["steps_to_target"]
        summary.update(steps=len(history), epochs=history[-1]["epoch"] if history else 0.0,
                       workers_before=workers, resize_epoch=resize[0] if resize else None,
                       epochs_to_target=next((r["epoch"] for r in history if r["step"] == reached), None))
    measured = [r for r in history if "dist_adasum" in r]
    for key in ("dist_adasum", "dist_average", "dist_sum", "adasum_scale"):
        summary[key] = sum(r[key] for r in measured) / len(measured) if measured else math.nan
    summary["seconds"] = time.perf_counter() - started
    timed = step_times[1:] or step_times
    summary["seconds_per_step"] = sum(timed) / len(timed)
    summary["device"], summary["worker_chunk"] = str(device), min(worker_chunk, workers)
    if device.type == "cuda":
        summary["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return history, summary


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
    summaries, curves = [], []
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
