"""Measuring a run and writing what it measured: the test evaluation, the per-step history,
the run's summary (final score, steps and epochs to the target) and the CSV/JSON files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from adasum.lab.config import Steps
from adasum.lab.task import Task

__all__ = ["evaluate", "crossing", "summarize", "metric_of", "targets_of", "write_csv", "write_json"]


@torch.no_grad()
def evaluate(task: Task, model: nn.Module) -> dict[str, float]:
    """Test loss and test score (accuracy or R^2) of ``model``; for a language task also bits
    per byte. The outputs of the test batches are put together before the loss and the score
    are taken, so that a score which is not a mean over examples (R^2) comes out right."""
    outputs, targets = zip(*((model(x), y) for x, y in task.test_batches()))
    out, target = torch.cat(outputs), torch.cat(targets)
    row = {"test_loss": task.loss(out, target).item(), "score": task.score(out, target)}
    if task.kind == "language":
        row["bits_per_byte"] = row["test_loss"] / math.log(2)
    return row


def crossing(evaluated: Sequence[dict], target: float) -> int | None:
    """The step of the first of two consecutive evaluations at or above ``target``, or None.
    One evaluation is not enough: a noisy score can touch the target once and fall back, and
    such a run has not reached it (a run whose last evaluation is its first at the target has
    not either)."""
    for here, after in zip(evaluated, evaluated[1:]):
        if here["score"] >= target and after["score"] >= target:
            return here["step"]
    return None


def summarize(history: Sequence[dict], plan: Steps, metric: str) -> dict:
    """One line per run: where it ended and when it first reached the target score; ``metric``
    names what the score is (:attr:`Task.metric`), for the reports.

    ``steps_to_target`` is the :func:`crossing` of the evaluations; the epochs (at the end, at the
    target) are those the rows carry, so a history of the new steps of a resumed run, or of
    stretches at two worker counts (an elastic run), counts them right. ``train_loss`` is the mean
    training loss over the last epoch's steps (one step's loss is too noisy to compare runs
    by); a run whose loss stopped being finite is ``diverged``.
    ``noise_scale`` and ``noise_scale_at_target`` are the smoothed gradient noise scale of the
    evaluation rows (B_simple in examples; NaN with one worker) at the end and where the target
    was first reached.
    """
    cfg = plan.config
    last_epoch = [r["loss"] for r in history[-plan.steps_per_epoch:]]
    evaluated = [r for r in history if "score" in r]
    reached = None
    if cfg.target is not None:
        reached = crossing(evaluated, cfg.target)
    final = evaluated[-1] if evaluated else {}
    at_target = next((r for r in evaluated if r["step"] == reached), {})
    return {
        "task": cfg.task, "reducer": cfg.reducer, "optimizer": cfg.optimizer,
        "workers": plan.workers, "batch": cfg.batch, "accum": cfg.accum,
        "examples_per_step": plan.per_step, "lr": cfg.lr, "seed": cfg.seed,
        "steps": len(history), "epochs": history[-1]["epoch"] if history else 0.0,
        "diverged": not all(math.isfinite(r["loss"]) for r in history),
        "train_loss": sum(last_epoch) / max(1, len(last_epoch)),
        "test_loss": final.get("test_loss", math.nan), "score": final.get("score", math.nan),
        "metric": metric,
        **({"bits_per_byte": final["bits_per_byte"]} if "bits_per_byte" in final else {}),
        "target": cfg.target,
        "steps_to_target": reached,
        "epochs_to_target": next((r["epoch"] for r in evaluated if r["step"] == reached), None),
        "noise_scale": final.get("noise_scale", math.nan),
        "noise_scale_at_target": at_target.get("noise_scale", math.nan),
        **({"sync_every": cfg.sync_every, "outer": cfg.outer, "outer_lr": cfg.outer_lr} if cfg.local else {}),
    }


def metric_of(summaries: Sequence[dict]) -> str:
    """What the runs' score is ("test accuracy", ...; "score" for records from before it was named)."""
    return next((s["metric"] for s in summaries if s.get("metric")), "score")


def targets_of(summaries: Sequence[dict]) -> list[float]:
    """The targets the runs were given, smallest first (none: no target was set)."""
    return sorted({s["target"] for s in summaries if s.get("target") is not None})


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Rows of dicts as CSV; the header is the union of the keys in first-seen order."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n")
