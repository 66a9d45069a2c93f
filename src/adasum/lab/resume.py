"""Continuing ``adasum train`` from its checkpoint on the same or another number of workers
(an elastic job under torchrun: a node died or joined, and the survivors resume).

What a resumed run keeps and what it may change:

* the step count continues from the checkpoint's, and so does the history;
* the examples per step E, the step size the run began with (workers x batch x accum), are
  kept when the new number of workers divides them: each worker then takes E / workers
  examples per step, in micro-batches of at most ``--batch`` (the largest size that divides
  its share; the accumulation makes up the rest). The steps then take the same examples as
  they would have on the old workers, and the learning-rate schedule is unchanged;
* when the workers do not divide E, each worker takes as many whole micro-batches of
  ``--batch`` as fit in E / workers (at least one example), so E becomes the nearest such
  size below it; the current epoch's remaining examples are taken in steps of that size, and
  the schedule is stretched or shrunk over the new number of remaining steps.
  What changed is said in one line before the workers start (:attr:`Resumed.note`);
* every rank's optimizer state (delta mode: its own moments; local SGD: its own weights too)
  comes from old rank ``rank mod N_old`` (:func:`adasum.optim.rank_state`); gradient mode's
  states are the same on every rank, so the rule changes nothing there.

Adasum's combination does not divide by the number of workers, so the learning rate is the
same for any world size; nothing here changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from adasum.lab.config import Origin, RunConfig, Steps

__all__ = ["Resumed", "plan_run", "split"]


@dataclass(frozen=True)
class Resumed:
    """The plan of a run that starts or resumes on ``plan.workers`` workers: ``config`` with
    the micro-batch and accumulation it runs at, ``target`` the examples per step it keeps
    when it can (those it began with), and ``note`` what changed from the checkpoint's
    plan (None: nothing, or a fresh start)."""

    config: RunConfig
    plan: Steps
    target: int
    note: str | None = None


def split(examples: int, workers: int, batch: int) -> tuple[int, int]:
    """``(micro-batch, accumulation)`` for about ``examples`` per step over ``workers``
    workers: a multiple of them is split exactly, each worker's share in the largest
    micro-batches of at most ``batch`` that divide it; otherwise each worker takes the whole
    micro-batches of ``batch`` (or fewer examples, at least one) that fit in its share."""
    share = max(1, examples // workers)
    if examples % workers:
        micro = min(batch, share)
        return micro, share // micro
    micro = max(d for d in range(1, min(batch, share) + 1) if share % d == 0)
    return micro, share // micro


def plan_run(config: RunConfig, workers: int, train_size: int, state: dict | None = None) -> Resumed:
    """The plan of ``config`` on ``workers`` workers, fresh (``state`` None) or resuming the
    checkpoint ``state`` (checked by :func:`adasum.lab.train.check_resume`)."""
    if state is None:
        plan = Steps(config, workers, train_size)
        return Resumed(config, plan, plan.per_step)
    old = state["workers"]
    # Checkpoints from before elastic resumption: the plan of the options they were written with.
    target = state.get("examples_per_step", old * config.batch * config.accum)
    origin = Origin(*state["position"]) if "position" in state else \
        Steps(config, old, train_size).position(state["step"])
    micro, accum = split(target, workers, config.batch)
    examples = workers * micro * accum
    run = config.with_(batch=micro, accum=accum)
    plan = Steps(run, workers, train_size, origin)
    was = state.get("plan", {"batch": config.batch, "accum": config.accum})
    if (old, micro, accum) == (workers, was["batch"], was["accum"]):
        return Resumed(run, plan, target)
    shape = f"{accum} micro-batch{'es' if accum > 1 else ''} of {micro} per worker"
    note = f"resuming step {origin.step} of a run written by {old} workers on {workers}: "
    if examples == target:
        note += f"{examples} examples per step kept ({shape}; the checkpoint's: {was['accum']} of {was['batch']})"
    else:
        before = Steps(config.with_(batch=was["batch"], accum=was["accum"]), old, train_size, origin)
        note += (f"{target} examples per step do not split over {workers} workers: {examples} per step "
                 f"from here ({shape}); {plan.total_steps} steps in all instead of {before.total_steps}, "
                 "the learning-rate schedule spread over them")
    return Resumed(run, plan, target, note)
