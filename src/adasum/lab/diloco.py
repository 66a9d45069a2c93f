"""``adasum study diloco``: Adasum as the outer combiner of local SGD (DiLoCo), against averaging.

Every run has N simulated workers, each stepping its own Adam (DiLoCo's inner AdamW, without
weight decay) at one fixed inner rate with warm-up and cosine decay, and synchronising every H
inner steps: the workers' deltas x_r - x are reduced (Adasum or the average) into D, and an
outer SGD with Nesterov momentum 0.9 (DiLoCo's outer optimizer) steps on the pseudo-gradient -D
at a constant outer rate (:class:`adasum.optim.LocalSGD`; simulated by
:mod:`adasum.lab.replicas`). Every run has the same budget of T inner steps, whatever N and H, so
that two runs at the same H synchronise the same T / H times. A worker's batch is fixed, so the
examples per inner step grow with N; the task is a stream, and a run of N workers draws
T x N x batch fresh examples (one epoch).

A run is judged by its final test loss (cross-entropy; a diverged run's is infinite): local SGD
is compared at a fixed budget, and steps to a target would be counted in whole
synchronisations, H inner steps apart. The outer rate is the tuned quantity, on one absolute
axis 2x apart. The plan (:func:`next_local_points`):

1. every setting (N, H), both combiners, every rate of the setting's axis, the sweep's seeds;
2. where a combiner's best rate (the lowest median loss over the sweep's seeds) sits at an end
   of a setting's axis, one 2x step beyond that end for both combiners, at most ``max_widen``
   steps beyond the first axis (:func:`adasum.lab.study_plan.widen`);
3. every seed at averaging's best rate of each setting and its two neighbours (averaging tuned
   per (N, H)); every seed at Adasum's one outer rate at every setting, the
   :func:`common_rate` of all settings (one rate for all, chosen once from the sweep); and every
   seed at averaging's own common rate over the N of each H (what one rate per H gives
   averaging: the second question of :mod:`adasum.lab.diloco_report`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from adasum.lab.config import ConfigError, RunConfig
from adasum.lab.sections import MIN_SEEDS, SCALES, Batching, Combiner
from adasum.lab.study import RunSpec, run_plan
from adasum.lab.study_plan import Point, neighbourhood, rounded, widen
from adasum.lab.task import Task
from adasum.lab.tasks import load_task

__all__ = ["Synced", "LocalScale", "LocalSection", "LOCAL_SECTIONS", "local_spec", "next_local_points",
           "loss_of", "best_rate", "common_rate", "by_setting", "run_local_study", "READING"]

#: The reading every run of a local section belongs to (a run two stages need is run once).
READING = "local"
CANDIDATE, BASELINE = "adasum", "average"


@dataclass(frozen=True)
class Synced(Batching):
    """Workers x per-worker batch, synchronising every ``sync_every`` inner steps."""

    sync_every: int = 1

    @property
    def label(self) -> str:
        return f"N{self.workers} b{self.batch} H{self.sync_every}"


@dataclass(frozen=True)
class LocalScale:
    """The grid of a local section at one scale: every N of ``workers`` with every H of
    ``sync_every``, ``batch`` examples per worker per inner step, ``budget`` inner steps per run
    (a multiple of every H), ``inner_lr`` the inner optimizer's peak rate, ``lrs`` the first axis
    of outer rates (at most 2x apart). Seeds as in :class:`adasum.lab.sections.Scale`;
    ``evals`` test evaluations per run."""

    workers: tuple[int, ...]
    sync_every: tuple[int, ...]
    batch: int
    budget: int
    inner_lr: float
    lrs: tuple[float, ...]
    sweep_seeds: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    max_widen: int = 2
    warmup_fraction: float = 0.05
    evals: int = 16

    @property
    def settings(self) -> tuple[Synced, ...]:
        return tuple(Synced(n, self.batch, sync_every=h) for h in self.sync_every for n in self.workers)

    @property
    def warmup(self) -> int:
        return math.ceil(self.warmup_fraction * self.budget)

    def check(self) -> LocalScale:
        lrs = sorted(self.lrs)
        if not lrs or any(b > 2 * a for a, b in zip(lrs, lrs[1:])):
            raise ConfigError(f"outer learning rates must be at most 2x apart, got {self.lrs}")
        if any(self.budget % h for h in self.sync_every):
            raise ConfigError(f"the budget of {self.budget} inner steps must be a multiple of every H {self.sync_every}")
        if len(self.seeds) < MIN_SEEDS or not set(self.sweep_seeds) <= set(self.seeds):
            raise ConfigError(f"a scale needs at least {MIN_SEEDS} seeds, the sweep's among them")
        return self


@dataclass(frozen=True)
class LocalSection:
    """A study of local SGD: the task, the inner optimizer (delta mode), the outer optimizer
    (:data:`adasum.lab.config.OUTER_OPTIMIZERS`), the combiners and the two scales."""

    name: str
    title: str
    task: str
    optimizer: str
    outer: str
    cpu: LocalScale
    gpu: LocalScale
    #: Both reduce the workers' deltas; neither follows a learning-rate recipe.
    combiners: ClassVar[dict[str, Combiner]] = {
        CANDIDATE: Combiner("adasum", "none", "delta"), BASELINE: Combiner("average", "none", "delta")}

    def scale(self, name: str) -> LocalScale:
        if name not in SCALES:
            raise ConfigError(f"unknown scale {name!r} (choose from {', '.join(SCALES)})")
        return (self.cpu if name == "cpu" else self.gpu).check()


LOCAL_SECTIONS: dict[str, LocalSection] = {s.name: s for s in (
    LocalSection(
        "diloco", "DiLoCo on teacher-mlp: inner Adam, outer Nesterov SGD, Adasum (one outer rate) against "
        "averaging (outer rate tuned per N and H)", "teacher-mlp", "adam", "nesterov",
        # Sized on a shared 2-core box: a run of 1,024 inner steps takes 4-20 s on one core.
        cpu=LocalScale(workers=(4, 8, 16), sync_every=(1, 16, 64, 256), batch=128, budget=1024, inner_lr=3e-3,
                       lrs=(0.25, 0.5, 1.0, 2.0)),
        gpu=LocalScale(workers=(4, 8, 16, 32, 64), sync_every=(1, 16, 64, 256), batch=256, budget=8192,
                       inner_lr=2e-3, lrs=(0.125, 0.25, 0.5, 1.0, 2.0, 4.0), sweep_seeds=(0, 1), evals=64),
    ),
)}


def local_spec(section: LocalSection, scale: LocalScale, point: Point) -> RunSpec:
    """The run of ``point``: its outer rate, the scale's inner rate, budget and warm-up."""
    s = point.setting
    if not isinstance(s, Synced):
        raise TypeError(f"a local section's setting is a Synced, got {type(s).__name__}")
    config = RunConfig(
        task=section.task, samples=scale.budget * s.examples, reducer=section.combiners[point.combiner].reducer,
        optimizer=section.optimizer, mode="delta", lr=scale.inner_lr, schedule="cosine", warmup=scale.warmup,
        batch=s.batch, epochs=1, seed=point.seed, evals_per_epoch=scale.evals, sync_every=s.sync_every,
        outer=section.outer, outer_lr=point.lr)
    return RunSpec(config.validated(), s, point)


def loss_of(record: dict) -> float:
    """A run's final test loss; infinite if it diverged."""
    loss = record["test_loss"]
    return math.inf if record["diverged"] or not math.isfinite(loss) else loss


def _median_loss(runs: Sequence[dict], seeds: Collection[int]) -> float:
    chosen = [r for r in runs if r["seed"] in seeds] or list(runs)
    return statistics.median(map(loss_of, chosen))


def best_rate(by_lr: dict[float, list[dict]], seeds: Collection[int]) -> float:
    """The rate with the lowest median final loss over ``seeds``; ties to the smaller rate."""
    return min(by_lr, key=lambda lr: (_median_loss(by_lr[lr], seeds), lr))


def common_rate(settings: dict[str, dict[float, list[dict]]], seeds: Collection[int]) -> float:
    """The one rate for all ``settings`` (label -> runs by rate): among the rates every setting
    ran, the one whose worst relative excess of median loss over each setting's best,
    ``max_s loss(s, r) / loss(s, best_s) - 1``, is smallest; ties to the smaller rate."""
    rates = sorted(set.intersection(*(set(by_lr) for by_lr in settings.values())))
    best = {label: _median_loss(by_lr[best_rate(by_lr, seeds)], seeds) for label, by_lr in settings.items()}

    def regret(lr: float) -> float:
        return max(_median_loss(by_lr[lr], seeds) / best[label] - 1 if math.isfinite(best[label]) else 0.0
                   for label, by_lr in settings.items())

    return min(rates, key=lambda lr: (regret(lr), lr))


def by_setting(records: Sequence[dict], combiner: str) -> dict[str, dict[float, list[dict]]]:
    """One combiner's runs by setting label, then by outer rate."""
    out: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        if r["combiner"] == combiner:
            out.setdefault(r["setting"], {}).setdefault(r["lr"], []).append(r)
    return out


def next_local_points(section: LocalSection, scale: LocalScale, records: Sequence[dict]) -> list[Point]:
    """The runs to make next (none: the study is complete); see the module's description."""
    done = {(r["combiner"], r["setting"], r["lr"], r["seed"]) for r in records}
    runs = {c: by_setting(records, c) for c in section.combiners}

    def missing(wanted: list[tuple[str, Synced, float, Sequence[int]]]) -> list[Point]:
        points = {(c, s, lr, seed): Point(READING, c, s, lr, seed)
                  for c, s, lr, seeds in wanted for seed in seeds if (c, s.label, lr, seed) not in done}
        return list(points.values())

    # A setting's axis: the first one and every rate either combiner ran there.
    axes = {s: sorted({*map(rounded, scale.lrs), *(lr for c in section.combiners for lr in runs[c].get(s.label, {}))})
            for s in scale.settings}
    sweep = missing([(c, s, lr, scale.sweep_seeds) for s, axis in axes.items() for c in section.combiners
                     for lr in axis])
    if sweep:
        return sweep
    widened = missing([(c, s, lr, scale.sweep_seeds) for s, axis in axes.items()
                       for lr in widen(axis, {best_rate(runs[c][s.label], scale.sweep_seeds) for c in section.combiners},
                                       list(map(rounded, scale.lrs)), scale.max_widen)
                       for c in section.combiners])
    if widened:
        return widened
    return missing(_seeded(scale, runs))


def _seeded(scale: LocalScale, runs: dict[str, dict[str, dict[float, list[dict]]]]) -> list[tuple]:
    """Stage 3 of the plan: every seed at averaging's best rates and their neighbours, at
    Adasum's one rate, and at averaging's common rate per H."""
    average, seeds = runs[BASELINE], scale.seeds
    wanted = [(BASELINE, s, lr, seeds) for s in scale.settings
              for lr in neighbourhood(sorted(average[s.label]), best_rate(average[s.label], scale.sweep_seeds))]
    one = common_rate(runs[CANDIDATE], scale.sweep_seeds)
    wanted += [(CANDIDATE, s, one, seeds) for s in scale.settings]
    for h in scale.sync_every:
        group = [s for s in scale.settings if s.sync_every == h]
        rate = common_rate({s.label: average[s.label] for s in group}, scale.sweep_seeds)
        wanted += [(BASELINE, s, rate, seeds) for s in group]
    return wanted


def run_local_study(section: LocalSection, scale: LocalScale, out: Path, *, device: str = "cpu",
                    worker_chunk: int | None = None, progress: bool = True,
                    on_run: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], int]:
    """:func:`adasum.lab.study.run_study` for a local section: the same files and resumption; a
    run of N workers trains on a stream of its own length (T x N x batch examples)."""
    from adasum.lab.device import resolve_device

    target = resolve_device(device)
    tasks: dict[int | None, Task] = {}

    def task_of(config: RunConfig) -> Task:
        if config.samples not in tasks:
            tasks[config.samples] = load_task(config.task, None, config.samples).to(target)
        return tasks[config.samples]

    return run_plan(lambda records: next_local_points(section, scale, records),
                    lambda point: local_spec(section, scale, point), task_of, out, name=section.name,
                    device=device, worker_chunk=worker_chunk, progress=progress, on_run=on_run)
