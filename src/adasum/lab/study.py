"""``adasum study NAME``: one section of the large-batch study (:mod:`adasum.lab.sections`), run
resumably until its plan (:mod:`adasum.lab.study_plan`) asks for no more runs.

Every run is simulated (:func:`adasum.lab.simulate.simulate_run`) with its setting's workers,
warm-up and cosine decay over an epoch budget that gives the largest E at least 128 steps.
Every finished run is written at once to ``OUT/runs/<id>.json`` (its configuration, summary
and history); a rerun of the same command loads those and runs only the rest, so an
interrupted study loses at most the run in progress. The id hashes the full configuration,
so changing a section's definition runs its changed points anew instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from adasum.lab.config import RunConfig, Steps
from adasum.lab.records import write_json
from adasum.lab.sections import Batching, Scale, Section
from adasum.lab.study_plan import Point, next_points
from adasum.lab.task import Task
from adasum.lab.tasks import load_task

__all__ = ["RunSpec", "run_spec", "run_study", "run_plan", "stored_runs"]


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its configuration, its setting, and what the study calls it."""

    config: RunConfig
    setting: Batching
    point: Point

    @property
    def key(self) -> str:
        """A file name: readable, and unique to everything that decides the run's result (two
        readings that need the same run share it)."""
        text = json.dumps({"config": self.config.as_dict(), "setting": asdict(self.setting)}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        c = self.config
        # The point's rate is the one the study tunes: the outer one in a local SGD section.
        return f"{c.optimizer}-{c.reducer}-{self.setting.label.replace(' ', '-')}-lr{self.point.lr:g}-s{c.seed}-{digest}"


def run_spec(section: Section, scale: Scale, point: Point, train_size: int) -> RunSpec:
    """The configuration of ``point``: the scale's budget, schedule and warm-up for its setting."""
    s, combiner = point.setting, section.combiners[point.combiner]
    config = RunConfig(
        task=section.task_at(scale), samples=scale.samples, reducer=combiner.reducer, optimizer=section.optimizer,
        mode=combiner.mode, lr=point.lr, schedule=scale.schedule, batch=s.batch, accum=s.accum,
        epochs=scale.epochs_for(train_size), seed=point.seed, target=scale.target,
        evals_per_epoch=scale.evals_per_epoch, evals_per_doubling=scale.evals_per_doubling)
    steps = Steps(config, s.workers, train_size).total_steps
    return RunSpec(config.with_(warmup=scale.warmup_for(steps)).validated(), s, point)


def _record(spec: RunSpec, summary: dict, train_size: int) -> dict:
    """The summary with the fields the protocol and the readings group by, and the run's
    planned length and warm-up (a run that reaches the target stops there, so its ``steps``
    say nothing of the budget); ``lr`` is the rate the study tunes (the outer one in a local
    SGD section, whose inner rate is ``inner_lr``)."""
    inner = {"inner_lr": spec.config.lr} if spec.config.local else {}
    return {**summary, "lr": spec.point.lr, **inner, "combiner": spec.point.combiner, "reading": spec.point.reading,
            "setting": spec.setting.label, "examples_per_step": spec.setting.examples,
            "first_workers": spec.setting.workers, "resize_to": spec.setting.resize_to,
            "budget": Steps(spec.config, spec.setting.workers, train_size).total_steps,
            "warmup": spec.config.warmup}


def _load(path: Path, spec: RunSpec) -> dict | None:
    """A finished run's stored result, or None when there is none for exactly this spec (a
    file cut short by an interruption is not a result)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("config") == spec.config.as_dict() else None


def _simulate(task: Task, spec: RunSpec, device: str, worker_chunk: int | None) -> dict:
    """Run ``spec``: the stored form of its result."""
    from adasum.lab.simulate import simulate_run

    s = spec.setting
    resize: tuple[int, int] | None = None
    if s.resize_to is not None:
        if s.resize_epoch is None:
            raise ValueError(f"setting {s.label}: resize_to needs resize_epoch, the epoch the worker count changes")
        resize = (s.resize_epoch, s.resize_to)
    # A run that has reached the target stops there: the readings compare steps to the target
    # and, only where runs did not reach it, final scores. An elastic run goes on, since what it
    # measures comes after the change of worker count.
    history, summary = simulate_run(task, spec.config, s.workers, distances=False, device=device,
                                    worker_chunk=worker_chunk, resize=resize, diagnostics=True,
                                    stop_at_target=resize is None)
    # Evaluation rows only: the report reads nothing else, and a small E's thousands of steps
    # would make each stored run a megabyte.
    evaluated = [row for row in history if "score" in row]
    return {"config": spec.config.as_dict(), "setting": asdict(s), "summary": summary, "history": evaluated}


def run_study(section: Section, scale: Scale, out: Path, *, task: Task | None = None,
              device: str = "cpu", worker_chunk: int | None = None, progress: bool = True,
              on_run: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], int]:
    """Make every run the plan asks for that is not already in ``out/runs``, until it asks for
    none; returns ``(records, curves, ran)``: one record per run (summary and grouping fields),
    the evaluation rows of every run's history tagged with its record's index, and how many
    runs this call made. ``on_run`` sees each new record as soon as its file is written."""
    from adasum.lab.device import resolve_device

    task = (task or load_task(section.task_at(scale), None, scale.samples)).to(resolve_device(device))
    train_size = task.train_size
    return run_plan(lambda records: next_points(section, scale, records),
                    lambda point: run_spec(section, scale, point, train_size), lambda config: task, out,
                    name=section.name, device=device, worker_chunk=worker_chunk, progress=progress, on_run=on_run)


def run_plan(plan: Callable[[list[dict]], list[Point]], spec_of: Callable[[Point], RunSpec],
             task_of: Callable[[RunConfig], Task], out: Path, *, name: str, device: str = "cpu",
             worker_chunk: int | None = None, progress: bool = True,
             on_run: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], int]:
    """:func:`run_study` for any plan: ``plan`` gives the points still needed after the records
    so far, ``spec_of`` a point's run, ``task_of`` the task (on ``device``) a run trains on."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    curves: list[dict] = []
    ran = 0
    # The total grows as the plan does: widened axes and added seeds are known only later.
    bar = tqdm(total=0, disable=not progress, unit="run", desc=name)
    while points := plan(records):
        bar.total += len(points)
        bar.refresh()
        for point in points:
            spec = spec_of(point)
            path = runs / f"{spec.key}.json"
            result = _load(path, spec)
            new = result is None
            if result is None:
                result = _simulate(task_of(spec.config), spec, device, worker_chunk)
                # Written whole, then renamed: an interruption leaves the old state or the new.
                write_json(result, path.with_suffix(".tmp"))
                os.replace(path.with_suffix(".tmp"), path)
                ran += 1
            records.append(_record(spec, result["summary"], task_of(spec.config).train_size))
            curves.extend({"run": len(records) - 1, **row} for row in result["history"] if "score" in row)
            bar.update()
            if new and on_run is not None:
                on_run(records[-1])
    bar.close()
    return records, curves, ran


def stored_runs(section: Section, scale: Scale, out: Path, train_size: int) -> tuple[list[dict], Counter]:
    """What an unfinished study has so far, running nothing: walks the plan as :func:`run_study`
    does, taking every run whose file is in ``out/runs`` and asking the plan again after each
    round, until it asks only for runs not there. Returns ``(records, unfinished)``:
    ``unfinished`` counts, per setting label, the runs at the sweep's seeds still missing (an
    E whose learning-rate sweep is not complete; its best rate may yet move)."""
    records: list[dict] = []
    asked: set[Point] = set()
    unfinished: Counter = Counter()
    while points := [p for p in next_points(section, scale, records) if p not in asked]:
        found = 0
        for point in points:
            asked.add(point)
            spec = run_spec(section, scale, point, train_size)
            stored = _load(out / "runs" / f"{spec.key}.json", spec)
            if stored is None:
                unfinished[spec.setting.label] += point.seed in scale.sweep_seeds
            else:
                records.append(_record(spec, stored["summary"], train_size))
                found += 1
        if not found:
            break
    return records, +unfinished
