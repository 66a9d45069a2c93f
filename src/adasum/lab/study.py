"""``adasum study NAME``: one section of the large-batch study, defined as data, run resumably.

A section (:class:`Section`) names a task, its optimizers and combiners, and two scales
(:class:`Scale`): ``cpu``, sized to take 30-50 minutes of one core's time, and ``gpu``, the
study proper. A scale fixes the grid of settings (workers x per-worker batch x accumulation,
optionally an elastic change of the worker count), the learning-rate grid, warm-up, seeds,
target and epoch budget. Every (optimizer, combiner, setting, learning rate, seed) is one
simulated run (:func:`adasum.lab.simulate.simulate_run`); the protocol
(:mod:`adasum.lab.protocol`) then picks each setting's best learning rate.

Every finished run is written at once to ``OUT/runs/<id>.json`` (its configuration, summary
and history); a rerun of the same command loads those and runs only the rest, so an
interrupted study loses at most the run in progress. The id hashes the full configuration,
so changing a section's definition runs its changed points anew instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from adasum.lab.config import ConfigError, Plan, RunConfig
from adasum.lab.records import write_json
from adasum.lab.tasks import Task, load_task

__all__ = ["Setting", "Scale", "Section", "SECTIONS", "RunSpec", "run_specs", "run_study", "lr_center"]


@dataclass(frozen=True)
class Setting:
    """Workers x per-worker batch x accumulation; with ``resize_to``, the run continues with
    that many workers from the start of epoch ``resize_epoch`` (elastic training)."""

    workers: int
    batch: int
    accum: int = 1
    resize_to: int | None = None
    resize_epoch: int | None = None

    @property
    def per_worker(self) -> int:
        return self.batch * self.accum

    @property
    def examples(self) -> int:
        """Examples before communication (before an elastic change)."""
        return self.workers * self.per_worker

    @property
    def label(self) -> str:
        workers = f"N{self.workers}" if self.resize_to is None else f"N{self.workers}>{self.resize_to}@{self.resize_epoch}"
        return f"{workers} b{self.batch} a{self.accum}"


@dataclass(frozen=True)
class Scale:
    """The grid of one scale of a section. ``base_lr`` is the learning rate for one worker
    taking ``reference`` examples per step; each combiner's grid is centred where its scaling
    rule (:func:`lr_center`) puts it for the setting, times ``lr_factors`` (consecutive
    factors at most 2x apart, as the protocol requires). Warm-up lasts ``warmup_epochs``
    epochs of each setting's steps (at least one step when positive)."""

    settings: tuple[Setting, ...]
    base_lr: float
    lr_factors: tuple[float, ...]
    reference: int
    warmup_epochs: float
    seeds: tuple[int, ...]
    target: float
    epochs: int
    samples: int | None = None
    evals_per_epoch: int = 8

    def check(self) -> Scale:
        factors = sorted(self.lr_factors)
        if not factors or any(b > 2 * a for a, b in zip(factors, factors[1:])):
            raise ConfigError(f"learning-rate factors must be at most 2x apart, got {self.lr_factors}")
        if not self.settings or not self.seeds:
            raise ConfigError("a scale needs at least one setting and one seed")
        return self


@dataclass(frozen=True)
class Section:
    """One section of the study: a task, its optimizers and combiners, and the way each
    combiner's learning rate follows the setting (``rules``, see :func:`lr_center`)."""

    name: str
    title: str
    task: str
    optimizers: tuple[str, ...]
    combiners: tuple[str, ...]
    rules: dict[str, str]
    cpu: Scale
    gpu: Scale

    def scale(self, name: str) -> Scale:
        if name not in ("cpu", "gpu"):
            raise ConfigError(f"unknown scale {name!r} (choose from cpu, gpu)")
        return (self.cpu if name == "cpu" else self.gpu).check()


def lr_center(rule: str, base_lr: float, setting: Setting, reference: int) -> float:
    """Where a combiner's learning-rate grid is centred for ``setting``:

    * ``examples``: the linear-scaling rule of averaging (Goyal et al.), the learning rate
      grows with E, since the average of N gradients is one gradient of an N times larger batch;
    * ``per-worker``: grows with each worker's examples only; summing (and Adasum of
      orthogonal gradients) already adds the workers' steps up, so a factor N is built in;
    * ``sqrt-examples``: grows with the square root of E, the usual rule for Adam-like
      optimizers, whose averaged delta does not grow with the batch;
    * ``none``: the one-worker learning rate whatever the setting.
    """
    if rule == "examples":
        return base_lr * setting.examples / reference
    if rule == "per-worker":
        return base_lr * setting.per_worker / reference
    if rule == "sqrt-examples":
        return base_lr * math.sqrt(setting.examples / reference)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown learning-rate rule {rule!r}")


def _grid(settings: Sequence[tuple[int, int, int]]) -> tuple[Setting, ...]:
    return tuple(Setting(n, b, a) for n, b, a in settings)


_MOMENTUM_RULES = {"adasum": "per-worker", "average": "examples", "sum": "per-worker"}
_DELTA_RULES = {"adasum": "none", "average": "sqrt-examples", "sum": "none"}
_SEEDS = (0, 1, 2)

SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section(
        "momentum", "momentum SGD, residual GroupNorm CNN on augmented digits", "augdigits-resnet",
        ("momentum",), ("adasum", "average", "sum"), _MOMENTUM_RULES,
        cpu=Scale(_grid([(4, 16, 1), (16, 16, 1), (16, 16, 4)]), base_lr=0.05,
                  lr_factors=(0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 2),
                  reference=16, warmup_epochs=0.25, seeds=_SEEDS, target=0.8, epochs=4, samples=4096),
        # At CPU scale every combiner's best rate was 1/64-1/4 of its rule's centre: the GPU grid
        # reaches as low.
        gpu=Scale(_grid([(32, 32, 1), (64, 32, 2), (64, 32, 8), (64, 32, 32)]), base_lr=0.05,
                  lr_factors=(0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 2), reference=32,
                  warmup_epochs=0.5, seeds=_SEEDS, target=0.95, epochs=4, samples=262144),
    ),
    *(Section(
        opt, f"{opt} in delta mode, byte-level transformer on the standard library", "stdlib-transformer",
        (opt,), ("adasum", "average"), _DELTA_RULES,
        cpu=Scale(_grid([(4, 16, 1), (16, 16, 1), (16, 16, 4)]), base_lr=lr, lr_factors=factors,
                  reference=16, warmup_epochs=0.25, seeds=_SEEDS, target=0.4, epochs=3, samples=4096),
        gpu=Scale(_grid([(64, 16, 1), (64, 16, 4), (64, 16, 16), (64, 16, 64)]), base_lr=lr,
                  lr_factors=(0.5, 1, 2, 4), reference=16, warmup_epochs=0.5, seeds=_SEEDS,
                  target=0.55, epochs=3, samples=131072),
    ) for opt, lr, factors in (
        ("adam", 3e-3, (0.125, 0.25, 0.5, 1, 2, 4)),
        # LAMB with Adasum at E = 1,024 did best at 4x: the grid goes one step further.
        ("lamb", 1e-2, (0.125, 0.25, 0.5, 1, 2, 4, 8)),
    )),
    Section(
        "convex", "momentum SGD, 10-class logistic regression (the convex sanity check)", "logistic",
        ("momentum",), ("adasum", "average", "sum"), _MOMENTUM_RULES,
        cpu=Scale(_grid([(16, 64, 1), (16, 64, 4), (64, 64, 1), (64, 64, 4)]), base_lr=0.025,
                  lr_factors=(0.5, 1, 2, 4, 8, 16, 32), reference=64, warmup_epochs=0.25, seeds=_SEEDS,
                  target=0.85, epochs=3, samples=65536, evals_per_epoch=8),
        gpu=Scale(_grid([(16, 64, 1), (16, 64, 4), (64, 64, 1), (64, 64, 4), (64, 64, 16)]), base_lr=0.025,
                  lr_factors=(0.5, 1, 2, 4, 8, 16, 32), reference=64, warmup_epochs=0.25,
                  seeds=(0, 1, 2, 3, 4), target=0.85, epochs=3, samples=262144, evals_per_epoch=16),
    ),
    Section(
        "elastic", "elastic training: momentum SGD, the worker count changed midway at the same "
        "learning rate", "augdigits-resnet", ("momentum",), ("adasum", "average"), _MOMENTUM_RULES,
        cpu=Scale((Setting(4, 16), Setting(16, 16), Setting(4, 16, 1, 16, 1)), base_lr=0.05,
                  lr_factors=(0.0625, 0.125, 0.25, 0.5, 1, 2), reference=16, warmup_epochs=0.25, seeds=_SEEDS,
                  target=0.8, epochs=4, samples=4096),
        gpu=Scale((Setting(8, 32), Setting(64, 32), Setting(8, 32, 1, 64, 4), Setting(64, 32, 1, 8, 4)),
                  base_lr=0.05, lr_factors=(0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 2), reference=32,
                  warmup_epochs=1, seeds=_SEEDS, target=0.95, epochs=8, samples=65536),
    ),
)}


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its configuration and the worker counts."""

    config: RunConfig
    setting: Setting

    @property
    def key(self) -> str:
        """A file name: readable, and unique to everything that decides the run's result."""
        text = json.dumps({"config": self.config.as_dict(), "setting": asdict(self.setting)}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        c = self.config
        return f"{c.optimizer}-{c.reducer}-{self.setting.label.replace(' ', '-')}-lr{c.lr:g}-s{c.seed}-{digest}"


def run_specs(section: Section, scale: Scale, train_size: int) -> list[RunSpec]:
    """Every run of ``scale``, settings larger than the training set left out."""
    specs = []
    for setting in scale.settings:
        try:
            plan = Plan(RunConfig(batch=setting.batch, accum=setting.accum), setting.workers, train_size)
        except ConfigError:
            continue
        warmup = math.ceil(scale.warmup_epochs * plan.steps_per_epoch)
        for optimizer in section.optimizers:
            for combiner in section.combiners:
                center = lr_center(section.rules[combiner], scale.base_lr, setting, scale.reference)
                for factor in scale.lr_factors:
                    for seed in scale.seeds:
                        config = RunConfig(
                            task=section.task, samples=scale.samples, reducer=combiner, optimizer=optimizer,
                            lr=float(f"{center * factor:.6g}"), warmup=warmup, batch=setting.batch,
                            accum=setting.accum, epochs=scale.epochs, seed=seed, target=scale.target,
                            evals_per_epoch=scale.evals_per_epoch)
                        specs.append(RunSpec(config.validated(), setting))
    return specs


def _record(spec: RunSpec, summary: dict) -> dict:
    """The summary with the fields the protocol groups by."""
    return {**summary, "combiner": spec.config.reducer, "setting": spec.setting.label,
            "examples_per_step": spec.setting.examples, "first_workers": spec.setting.workers,
            "resize_to": spec.setting.resize_to}


def _load(path: Path, spec: RunSpec) -> dict | None:
    """A finished run's stored result, or None when there is none for exactly this spec (a
    file cut short by an interruption is not a result)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("config") == spec.config.as_dict() else None


def run_study(section: Section, scale: Scale, out: Path, *, task: Task | None = None,
              device: str = "cpu", worker_chunk: int | None = None, progress: bool = True,
              on_run: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], int]:
    """Run every run of ``scale`` not already in ``out/runs``; returns ``(records, curves,
    ran)``: one record per run (summary and grouping fields), the history rows of every run
    tagged with its record's index, and how many runs this call made. ``on_run`` sees each new
    record as soon as its file is written."""
    from adasum.lab.simulate import resolve_device, simulate_run

    task = task or load_task(section.task, None, scale.samples)
    task = task.to(resolve_device(device))
    specs = run_specs(section, scale, task.train_size)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stored = {spec.key: _load(runs / f"{spec.key}.json", spec) for spec in specs}
    records, curves, ran = [], [], 0
    bar = tqdm(total=len(specs), initial=sum(v is not None for v in stored.values()),
               disable=not progress, unit="run", desc=section.name)
    for spec in specs:
        result = stored[spec.key]
        if result is None:
            s = spec.setting
            resize = None if s.resize_to is None else (s.resize_epoch, s.resize_to)
            history, summary = simulate_run(task, spec.config, s.workers, distances=False, device=device,
                                            worker_chunk=worker_chunk, resize=resize, diagnostics=True)
            result = {"config": spec.config.as_dict(), "setting": asdict(s),
                      "summary": _record(spec, summary), "history": history}
            path = runs / f"{spec.key}.json"
            # Written whole, then renamed: an interruption leaves the old state or the new.
            write_json(result, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            ran += 1
            bar.update()
            if on_run is not None:
                on_run(result["summary"])
        records.append(result["summary"])
        curves.extend({"run": len(records) - 1, **row} for row in result["history"])
    bar.close()
    return records, curves, ran
