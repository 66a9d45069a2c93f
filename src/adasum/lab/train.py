"""The training loop of ``adasum train``: one worker of a real data-parallel run.

Every worker holds the whole model, takes its share of each step's examples (the same
examples, in the same order, as worker r of ``adasum simulate``), computes its gradient over
``accum`` micro-batches, and the workers combine over torch.distributed:

* gradient mode (sgd, momentum): the model is wrapped in
  :class:`torch.nn.parallel.DistributedDataParallel`, which combines the gradients during the
  backward pass of the step's last micro-batch (the others run under ``no_sync``): Adasum
  through the communication hook :func:`adasum.ddp.adasum_hook`, the sum through
  :func:`sum_hook`, the average through DDP's own allreduce. Each worker then runs the same
  optimizer step on the combined gradient;
* delta mode (adam, lamb): each worker steps its own optimizer on its own gradient, the
  parameter deltas are combined, and every worker applies the combined delta (with Adasum
  through :class:`adasum.optim.DistributedOptimizer`).

In delta mode the average and the sum of the deltas are one allreduce (:func:`combine_`). Rank 0 evaluates,
shows the progress bar, writes the history and the checkpoints; the checkpoint holds every
rank's optimizer state, because in delta mode each worker's moments are its own.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from adasum.ddp import AdasumState, adasum_hook
from adasum.lab.config import DELTA_MODE, ConfigError, Plan, RunConfig
from adasum.lab.optimizers import make_optimizer, set_lr
from adasum.lab.records import evaluate, summarize, write_csv, write_json
from adasum.lab.tasks import Task, load_task
from adasum.optim import DistributedOptimizer

__all__ = ["train_worker", "check_resume", "combine_", "sum_hook", "data_parallel"]

CHECKPOINT = "checkpoint.pt"


def combine_(tensors: list[torch.Tensor], combiner: str) -> None:
    """Replace each rank's tensors, in place, by their average or sum over all ranks (delta
    mode; Adasum of deltas goes through :class:`adasum.optim.DistributedOptimizer`)."""
    if combiner not in ("average", "sum"):
        raise ValueError(f"combine_ averages or sums, not {combiner!r}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if combiner == "average":
        flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_hook(state, bucket):  # no annotations: DDP rejects the strings this module's would be
    """DDP communication hook: the bucket's gradients (a ``dist.GradBucket``) summed over all
    ranks, as a future. DDP's own allreduce divides by the world size; a hook receives the
    gradients un-divided."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: torch.nn.Module, combiner: str) -> DistributedDataParallel:
    """``model`` under DDP, its gradients combined by ``combiner`` in the backward pass."""
    ddp = DistributedDataParallel(model)
    if combiner == "adasum":
        ddp.register_comm_hook(AdasumState(), adasum_hook)
    elif combiner == "sum":
        ddp.register_comm_hook(None, sum_hook)
    return ddp


def check_resume(path: str | os.PathLike, config: RunConfig, workers: int) -> dict:
    """The checkpoint at ``path``, if it can continue ``config`` on ``workers`` workers: same
    options except a larger or equal epoch count. Raises ConfigError otherwise."""
    try:
        state = torch.load(path, weights_only=False)
        saved = RunConfig(**state["config"])
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}") from None
    if state["workers"] != workers:
        raise ConfigError(f"checkpoint was written by {state['workers']} workers, not {workers}")
    if saved.with_(epochs=config.epochs) != config or config.epochs < saved.epochs:
        raise ConfigError("checkpoint was written with other options; only --epochs may grow")
    return state


def train_worker(
    rank: int, workers: int, config: RunConfig, out: str | None = None,
    resume: str | None = None, progress: bool = True,
) -> dict | None:
    """Run ``config`` as worker ``rank`` of ``workers`` (the process group is initialised).
    Rank 0 returns ``{"summary": ..., "history": [...]}``; the other ranks return None."""
    task = load_task(config.task, config.data, config.samples)
    plan = Plan(config, workers, len(task.x_train))
    model = task.build_model(config.seed)
    params = list(model.parameters())
    optimizer = make_optimizer(config.optimizer, params, config.lr)
    if config.optimizer not in DELTA_MODE:
        # Gradient mode: DDP combines the gradients (the checkpoint keeps the bare model).
        net = data_parallel(model, config.reducer)
    else:
        net = model
        if config.reducer == "adasum":
            # The library's delta-mode wrapper; averaging and summing deltas are done in _step.
            optimizer = DistributedOptimizer(optimizer)
    start, history = 0, []
    if resume is not None:
        state = check_resume(resume, config, workers)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizers"][rank])
        start, history = state["step"], state["history"]
    bar = tqdm(total=plan.total_steps, initial=start, disable=not (progress and rank == 0),
               desc=f"{config.reducer}/{config.optimizer}", unit="step", leave=False)
    for step, examples in plan.batches(start):
        set_lr(optimizer, plan.lr_at(step))
        mine = examples[rank * plan.per_worker:(rank + 1) * plan.per_worker]
        loss = _step(task, net, optimizer, mine, config)
        row = {"step": step + 1, "epoch": plan.epoch_of(step + 1), "lr": plan.lr_at(step), "loss": loss}
        if rank == 0 and plan.evaluates_after(step + 1):
            row.update(evaluate(task, model))
            bar.set_postfix(loss=f"{loss:.4f}", score=f"{row['score']:.4f}")
        history.append(row)
        bar.update()
        if not math.isfinite(loss):
            break
        if out is not None and (step + 1) % plan.steps_per_epoch == 0:
            _checkpoint(Path(out), rank, workers, config, model, optimizer, step + 1, history)
    bar.close()
    if rank != 0:
        return None
    summary = summarize(history, plan)
    if out is not None:
        write_csv(history, Path(out) / "history.csv")
        write_json({"summary": summary, "config": config.as_dict(), "history": history},
                   Path(out) / "history.json")
    return {"summary": summary, "history": history}


def _step(task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          examples: torch.Tensor, config: RunConfig) -> float:
    """One step of this worker (``model`` is under DDP in gradient mode); returns the mean
    training loss over all workers' examples."""
    params = list(model.parameters())
    optimizer.zero_grad(set_to_none=False)
    local = torch.zeros((), dtype=torch.float64)
    micros = examples.split(config.batch)
    for k, micro in enumerate(micros):
        # DDP combines in the last micro-batch's backward pass; the others only accumulate.
        last = k == len(micros) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            # Dividing by accum makes the accumulated gradient the mean over the worker's examples.
            loss = task.loss(model(task.x_train[micro]), task.y_train[micro]) / config.accum
            loss.backward()
        local += loss.detach()
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.step()
    elif config.optimizer in DELTA_MODE:
        old = [p.detach().clone() for p in params]
        optimizer.step()
        deltas = [p.detach() - o for p, o in zip(params, old)]
        combine_(deltas, config.reducer)
        with torch.no_grad():
            for p, o, d in zip(params, old, deltas):
                p.copy_(o + d)
    else:
        optimizer.step()  # DDP has combined the gradients
    dist.all_reduce(local)
    return local.item() / dist.get_world_size()


def _checkpoint(out: Path, rank: int, workers: int, config: RunConfig, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, step: int, history: list[dict]) -> None:
    """Rank 0 writes model, every rank's optimizer state and the history, atomically."""
    states = [None] * workers if rank == 0 else None
    dist.gather_object(optimizer.state_dict(), states, dst=0)
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save({"config": config.as_dict(), "workers": workers, "step": step,
                "model": model.state_dict(), "optimizers": states, "history": history}, tmp)
    tmp.replace(out / CHECKPOINT)
