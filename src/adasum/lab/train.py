"""The training loop of ``adasum train``: one worker of a real data-parallel run.

Every worker holds the whole model, takes its share of each step's examples (the same
examples, in the same order, as worker r of ``adasum simulate``), computes its gradient over
``accum`` micro-batches, and the workers reduce over torch.distributed with the run's reducer
(Adasum, the average or the sum, :data:`adasum.lab.config.REDUCERS`), through the library's
front doors only:

* gradient mode (``--mode gradient``, the default of sgd and momentum): the model is wrapped in
  :class:`torch.nn.parallel.DistributedDataParallel` with the communication hook
  :func:`adasum.ddp.adasum_hook`, which reduces the gradients during the backward pass of the
  step's last micro-batch (the others run under ``no_sync``). Each worker then runs the same
  optimizer step on the reduced gradient;
* delta mode (``--mode delta``, the default of adam and lamb): :class:`adasum.optim.DistributedOptimizer` steps each worker's own
  optimizer on its own gradient, reduces the parameter deltas and applies the result;
* local SGD (``--sync-every H``, ``--outer-optimizer``, delta mode): :class:`adasum.optim.LocalSGD`
  steps each worker's optimizer H times on its own weights between reductions of the deltas,
  and the outer optimizer, if any, steps on the reduced delta (DiLoCo). Every synchronisation's
  row of the history carries the statistics of the deltas it reduced, per layer
  (``orth/...``, :meth:`adasum.Stats.summary`: cosines, and Adasum's scaling, 1/2 = averaged,
  1 = summed), and the evaluations score the weights of the last synchronisation, as the
  simulator's do; the noise scale, which needs the gradients of one point, is not measured.

The baselines thus run the same code as Adasum: a difference between reducers in a study comes
from the reduction alone. Both front doors keep statistics (``stats=True``), from which every
worker follows the gradient noise scale (:class:`adasum.RunningNoiseScale`); evaluation rows
carry it as ``noise_scale``. In delta mode that costs one more all-reduce of the gradients per
step (:class:`adasum.optim.DistributedOptimizer`). Rank 0 evaluates, shows the progress bar, writes the history and the
checkpoints (at the end of every epoch, and every ``checkpoint_every`` steps if given), whole or
not at all (written aside, then renamed over the last). The checkpoint holds every rank's
optimizer state, because in delta mode each worker's moments are its own, where the run stands
in its order of examples, and a checksum, so that a damaged file is refused. A run resumes from
it on the same or another number of workers (:mod:`adasum.lab.resume`). At every checkpoint
every rank compares the digests of every rank's parameters, which must be bit-identical (except
local SGD's between synchronisations), and all raise if they differ; the history records the
final ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import adasum
from adasum.ddp import AdasumState, adasum_hook
from adasum.lab.config import ConfigError, RunConfig, make_reducer
from adasum.lab.optimizers import make_optimizer, make_outer, set_lr
from adasum.lab.records import evaluate, summarize, write_csv, write_json
from adasum.lab.resume import Resumed, plan_run
from adasum.lab.task import Task
from adasum.lab.tasks import load_task
from adasum.optim import DistributedOptimizer, LocalSGD, rank_state
from adasum.optim._elastic import gather_states, save_atomically

__all__ = ["train_worker", "check_resume", "save_checkpoint", "load_checkpoint", "digest", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
#: A checkpoint file holds ``{"format": _FORMAT, "sha256": ..., "payload": uint8 tensor}``, the
#: payload being the saved state (a tensor is stored as raw bytes; pickled bytes would not be):
#: a flipped byte is refused instead of resuming from garbage.
_FORMAT = "adasum-checkpoint-1"
#: What the state holds; a file without one of them cannot continue a run.
_FIELDS = ("config", "workers", "step", "model", "optimizers", "history")


def _data_parallel(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, AdasumState | DistributedOptimizer, contextlib.AbstractContextManager]:
    """What this worker runs forward and steps, the front door whose ``last_stats`` hold the
    step's statistics (for the gradient noise scale), and what to close when the run ends (the
    reducer's buffers; in gradient mode also the hook's thread and process group)."""
    reducer = make_reducer(config.reducer)
    if config.local:
        outer = make_outer(config.outer, model.parameters(), config.outer_lr) if config.outer else None
        local = LocalSGD(optimizer, reducer, sync_every=config.sync_every, outer=outer, stats=True,
                         named_parameters=model.named_parameters())
        return model, local, local, reducer
    if config.reduces_deltas:
        # Each worker's optimizer steps on its own gradient; the wrapper reduces the deltas.
        wrapped = DistributedOptimizer(optimizer, reducer, stats=True)
        return model, wrapped, wrapped, reducer
    # The hook reduces the gradients in the backward pass, before the (identical) steps.
    ddp = DistributedDataParallel(model)
    state = AdasumState(reducer, stats=True)
    ddp.register_comm_hook(state, adasum_hook)
    return ddp, optimizer, state, state


def check_resume(path: str | os.PathLike, config: RunConfig, model: torch.nn.Module) -> dict:
    """The checkpoint at ``path``, if it can continue ``config`` with ``model``: intact,
    complete, the same options except a larger or equal epoch count, and parameters of the
    model's shapes. Raises ConfigError naming the file otherwise. The number of workers that
    wrote it does not matter (:mod:`adasum.lab.resume`)."""
    name = repr(str(path))
    state = load_checkpoint(path)
    missing = [k for k in _FIELDS if k not in state]
    if missing:
        raise ConfigError(f"checkpoint {name} lacks {', '.join(missing)}")
    try:
        saved = RunConfig(**state["config"])
    except TypeError:
        raise ConfigError(f"checkpoint {name} holds options this version does not know") from None
    changed = saved.with_(epochs=config.epochs).differences(config)
    if changed:
        raise ConfigError(f"checkpoint was written with {', '.join(changed)}; only --epochs may grow")
    if config.epochs < saved.epochs:
        raise ConfigError(f"checkpoint was written with {', '.join(saved.differences(config))}; "
                          "--epochs may grow, not shrink")
    if len(state["optimizers"]) != state["workers"] or len(state["history"]) != state["step"]:
        raise ConfigError(f"checkpoint {name} is inconsistent: {len(state['optimizers'])} optimizer "
                          f"states, {len(state['history'])} history rows for step {state['step']}")
    _check_shapes(name, state["model"], model.state_dict())
    return state


def _check_shapes(name: str, saved: dict, model: dict) -> None:
    """The same tensors by name and shape: the options can match while the model cannot (a
    data file that now has another number of features or classes)."""
    for key in saved.keys() | model.keys():
        there = tuple(saved[key].shape) if key in saved else None
        here = tuple(model[key].shape) if key in model else None
        if there != here:
            raise ConfigError(f"checkpoint {name} does not fit the model: {key!r} has shape "
                              f"{there} there, {here} here (did the data change?)")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` with its checksum, atomically: to a temporary file that reaches the disk
    before it replaces ``path``, so an interrupted or killed run leaves the previous checkpoint
    whole."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    save_atomically({"format": _FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                     "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state :func:`save_checkpoint` wrote to ``path``, after checking its checksum;
    ConfigError naming the file if it is missing, damaged or not a checkpoint."""
    name = repr(str(path))
    try:
        wrapper = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {name} does not exist") from None
    except Exception as e:  # a truncated, damaged or foreign file: say so in one line
        raise ConfigError(f"cannot read checkpoint {name} (damaged, or not a checkpoint): "
                          f"{type(e).__name__}") from None
    if not (isinstance(wrapper, dict) and wrapper.get("format") == _FORMAT
            and isinstance(wrapper.get("payload"), torch.Tensor)):
        raise ConfigError(f"checkpoint {name} is not an adasum checkpoint (or predates checksums)")
    payload = wrapper["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapper.get("sha256"):
        raise ConfigError(f"checkpoint {name} is corrupted: its checksum does not match its contents")
    state = torch.load(io.BytesIO(payload), weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {name} holds no training state")
    return state


def train_worker(
    rank: int, workers: int, config: RunConfig, out: str | None = None,
    resume: str | None = None, progress: bool = True, checkpoint_every: int = 0,
) -> dict | None:
    """Run ``config`` as worker ``rank`` of ``workers`` (the process group is initialised),
    from the start or from the checkpoint ``resume`` (written by any number of workers);
    checkpoint into ``out`` at the end of every epoch and every ``checkpoint_every`` steps (0:
    epochs only). Rank 0 returns ``{"summary": ..., "history": [...]}``; the others None."""
    task = load_task(config.task, config.data, config.samples)
    model = task.build_model(config.seed)
    state = check_resume(resume, config, model) if resume is not None else None
    run = plan_run(config, workers, task.train_size, state)
    plan = run.plan
    # The checkpoint and the evaluation use the bare model, whatever wraps it for training.
    net, optimizer, front, resources = _data_parallel(
        model, make_optimizer(config.optimizer, model.parameters(), config.lr), run.config)
    noise = adasum.RunningNoiseScale()
    history: list[dict] = []
    if state is not None:
        # Rank r continues old rank r mod N's optimizer (and, with local SGD, its weights).
        model.load_state_dict(rank_state(state["models"], rank) if "models" in state else state["model"])
        optimizer.load_state_dict(rank_state(state["optimizers"], rank))
        history = state["history"]
    # Only rank 0 draws a bar, so a thread lock is enough; tqdm's default adds a named
    # semaphore that a worker ended by Ctrl-C or a signal never unlinks (a leak warning at exit).
    tqdm.set_lock(threading.RLock())
    bar = tqdm(total=plan.total_steps, initial=plan.origin.step, disable=not (progress and rank == 0),
               desc=f"{config.reducer}/{config.optimizer}", unit="step", leave=False)
    with resources:
        for step, examples in plan.batches():
            set_lr(optimizer, plan.lr_at(step))
            mine = examples[rank * plan.per_worker:(rank + 1) * plan.per_worker]
            loss = _step(task, net, optimizer, mine, run.config)
            row = {"step": step + 1, "epoch": plan.epoch_of(step + 1), "lr": plan.lr_at(step), "loss": loss}
            if isinstance(front, LocalSGD):
                if front.inner_steps == 0 and front.last_stats is not None:  # this step synchronised
                    row.update(front.last_stats.summary("orth"))
            else:
                assert front.last_stats is not None, "the front door keeps statistics (stats=True)"
                noise.update(front.last_stats.noise_scale(plan.per_worker))
            if rank == 0 and plan.evaluates_after(step + 1):
                row.update(_evaluate(task, model, front), noise_scale=noise.value)
                bar.set_postfix(loss=f"{loss:.4f}", score=f"{row['score']:.4f}", noise=f"{noise.value:.3g}")
            history.append(row)
            bar.update()
            if not math.isfinite(loss):
                break
            due = plan.ends_epoch(step + 1) or (checkpoint_every > 0 and (step + 1) % checkpoint_every == 0)
            if out is not None and due:
                _checkpoint(Path(out), rank, config, run, model, optimizer, step + 1, history)
    bar.close()
    digests = gather_states(digest(model))
    if rank != 0:
        return None
    summary = summarize(history, plan, task.metric)
    if out is not None:
        write_csv(history, Path(out) / "history.csv")
        write_json({"summary": summary, "config": config.as_dict(), "digests": digests, "history": history},
                   Path(out) / "history.json")
    return {"summary": summary, "history": history, "digests": digests}


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers, in order: equal digests, equal bits."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _evaluate(task: Task, model: torch.nn.Module, front: AdasumState | DistributedOptimizer) -> dict[str, float]:
    """The test scores of the model; with local SGD in the middle of a cycle, of the weights of
    the last synchronisation (this rank's own are not the model the workers share)."""
    start = front.state_dict()["start"] if isinstance(front, LocalSGD) else None
    if start is None:
        return evaluate(task, model)
    params: list[torch.Tensor] = list(model.parameters())  # the optimizer's, in its order
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, start)
    try:
        return evaluate(task, model)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, own)


def _step(task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          examples: torch.Tensor, config: RunConfig) -> float:
    """One step of this worker (``model`` is under DDP in gradient mode, ``optimizer`` a
    DistributedOptimizer in delta mode); returns the mean training loss over all workers'
    examples."""
    optimizer.zero_grad(set_to_none=False)
    local = torch.zeros((), dtype=torch.float64)
    micros = examples.split(config.batch)
    for k, micro in enumerate(micros):
        # DDP reduces in the last micro-batch's backward pass; the others only accumulate.
        last = k == len(micros) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            # Dividing by accum makes the accumulated gradient the mean over the worker's examples.
            x, y = task.examples(micro)
            loss = task.loss(model(x), y) / config.accum
            loss.backward()
        local += loss.detach()
    # Gradient mode: the step on the gradient DDP reduced. Delta mode: the local step, the
    # reduction of the deltas and their application.
    optimizer.step()
    dist.all_reduce(local)
    return local.item() / dist.get_world_size()


def _checkpoint(out: Path, rank: int, config: RunConfig, run: Resumed, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, step: int, history: list[dict]) -> None:
    """Rank 0 writes model, every rank's optimizer state, where the run stands, the plan it
    runs and the history; with local SGD also every rank's weights (``models``), which differ
    between synchronisations. The others must hold the same bits as rank 0: a checkpoint of
    diverged replicas would resume a run that never was, so every rank compares the digests
    and every rank raises."""
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(model))
    if not config.local and len(set(digests)) > 1:
        raise RuntimeError(f"adasum train: the replicas differ after step {step} (digests "
                           f"{', '.join(str(d)[:12] for d in digests)}); no checkpoint written")
    ranks = gather_states({"optimizer": optimizer.state_dict(),
                           "model": model.state_dict() if config.local else None})
    if ranks is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    c = run.config
    state = {"config": config.as_dict(), "workers": run.plan.workers, "step": step,
             "position": tuple(run.plan.position(step)), "examples_per_step": run.target,
             "plan": {"batch": c.batch, "accum": c.accum}, "model": model.state_dict(),
             "optimizers": [r["optimizer"] for r in ranks], "history": history}
    if config.local:
        state["models"] = [r["model"] for r in ranks]
    save_checkpoint(state, out / CHECKPOINT)
