"""The sections of the large-batch study, as data: what ``adasum study NAME`` runs.

A section (:class:`Section`) names a task, its optimizer, the two combiners it compares
(Adasum and the paper's baseline, each a reducer in a mode) and two scales (:class:`Scale`):
``cpu``, small enough for a laptop, and ``gpu``, the study proper.

A scale is defined from the task's critical batch ``b_crit`` (McCandlish et al. 2018: the
examples per step beyond which more examples per step stop saving steps): its grid of
examples before communication E runs from below ``b_crit`` to ``span`` x ``b_crit``, 2x apart,
grown by the number of workers at a per-worker batch at or below ``b_crit``
(:func:`critical_grid`). The epoch budget follows from the grid: the largest E gets at least
``min_steps`` optimizer steps (:meth:`Scale.epochs_for`). Every combiner is tuned on one
absolute learning-rate axis (``lrs``, widened by the study while a best rate sits at its edge)
with warm-up and cosine decay; ``base_lr`` is the one-worker rate the recipe reading starts
from (:func:`recipe_lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from adasum.lab.config import ConfigError

__all__ = ["Batching", "Combiner", "Scale", "Section", "SECTIONS", "critical_grid", "recipe_lr", "MIN_STEPS",
           "SCALES"]

#: Optimizer steps the largest E gets at least: fewer, and a setting's steps to the target
#: are decided by the schedule's warm-up and decay rather than by the combiner.
MIN_STEPS = 128
#: The scales every section has: its fields ``cpu`` and ``gpu``.
SCALES = ("cpu", "gpu")
#: The least number of seeds at the best learning rate and its two neighbours.
MIN_SEEDS = 5


@dataclass(frozen=True)
class Batching:
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
    def largest_examples(self) -> int:
        """The most examples one step of the run takes (after an elastic change too)."""
        return max(self.workers, self.resize_to or 0) * self.per_worker

    @property
    def label(self) -> str:
        workers = f"N{self.workers}" if self.resize_to is None else f"N{self.workers}>{self.resize_to}@{self.resize_epoch}"
        return f"{workers} b{self.batch} a{self.accum}"


@dataclass(frozen=True)
class Combiner:
    """A reducer in a mode (``None``: the optimizer's default, see :class:`~adasum.lab.config.RunConfig`),
    and the rule its recipe learning rate follows (:func:`recipe_lr`)."""

    reducer: str
    rule: str
    mode: str | None = None


def critical_grid(b_crit: float, batch: int, *, span: int = 32, max_workers: int = 64,
                  accum: tuple[int, ...] = ()) -> tuple[Batching, ...]:
    """Settings whose E runs 2x apart from the largest ``batch`` x 2^k at or below ``b_crit``/2
    (``batch`` itself if that is larger) up to the first at or above ``span`` x ``b_crit``.
    E grows by the number of workers at ``batch`` examples per worker; past ``max_workers``
    (what a simulation can hold) by accumulation. ``accum`` adds, at the largest E, the same E
    with fewer workers accumulating that many micro-batches: accumulation as its own axis."""
    if not 1 <= batch <= b_crit:
        raise ConfigError(f"the per-worker batch {batch} must be at most the critical batch {b_crit:g}")
    examples = batch
    while examples * 2 <= b_crit / 2:
        examples *= 2
    grid = []
    while True:
        workers = min(examples // batch, max_workers)
        grid.append(Batching(workers, batch, examples // (workers * batch)))
        if examples >= span * b_crit:
            break
        examples *= 2
    last = grid[-1]
    grid += [Batching(last.workers // a, batch, last.accum * a) for a in accum if last.workers // a >= 1]
    return tuple(grid)


def recipe_lr(rule: str, base_lr: float, setting: Batching, reference: int) -> float:
    """The learning rate a scaling recipe gives ``setting``, from ``base_lr`` for one worker
    taking ``reference`` examples per step:

    * ``examples``: the linear-scaling rule of averaging (Goyal et al. 2017): the average of N
      gradients is one gradient of an N times larger batch;
    * ``sqrt-examples``: the square root of E, the usual rule for Adam-like optimizers, whose
      averaged update does not grow with the batch;
    * ``per-worker``: grows with each worker's examples only, what the paper prescribes for
      Adasum (the one-worker rate at the worker's own batch): Adasum already adds the workers'
      steps up where their gradients are orthogonal;
    * ``none``: ``base_lr`` whatever the setting.
    """
    if rule == "examples":
        return base_lr * setting.examples / reference
    if rule == "sqrt-examples":
        return base_lr * math.sqrt(setting.examples / reference)
    if rule == "per-worker":
        return base_lr * setting.per_worker / reference
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown learning-rate rule {rule!r}")


@dataclass(frozen=True)
class Scale:
    """The grid of one scale of a section (see the module's description). ``lrs``: the first
    learning-rate axis, absolute and the same for every combiner and setting, consecutive rates
    at most 2x apart; the study adds a 2x step at an end where a best rate sits, at most
    ``max_widen`` per end. ``sweep_seeds`` run at every rate; ``seeds`` (at least
    :data:`MIN_SEEDS`) at each combiner's best rate and its two neighbours. Warm-up lasts
    ``warmup_fraction`` of a run's steps, at least ``min_warmup``. Evaluations: ``evals_per_epoch``
    per epoch and ``evals_per_doubling`` per doubling of the step count (see
    :class:`~adasum.lab.config.RunConfig`)."""

    settings: tuple[Batching, ...]
    b_crit: float
    lrs: tuple[float, ...]
    base_lr: float
    reference: int
    target: float
    samples: int | None = None
    sweep_seeds: tuple[int, ...] = (0, 1)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    min_steps: int = MIN_STEPS
    max_widen: int = 4
    warmup_fraction: float = 0.05
    min_warmup: int = 10
    schedule: str = "cosine"
    evals_per_epoch: int = 8
    evals_per_doubling: int = 8
    #: The task at this scale, where it is not the section's (a larger model on a GPU).
    task: str | None = None

    def check(self) -> Scale:
        lrs = sorted(self.lrs)
        if not lrs or any(b > 2 * a for a, b in zip(lrs, lrs[1:])):
            raise ConfigError(f"learning rates must be at most 2x apart, got {self.lrs}")
        if not self.settings:
            raise ConfigError("a scale needs at least one setting")
        if len(self.seeds) < MIN_SEEDS or not set(self.sweep_seeds) <= set(self.seeds):
            raise ConfigError(f"a scale needs at least {MIN_SEEDS} seeds, the sweep's among them")
        if self.min_steps < MIN_STEPS:
            raise ConfigError(f"the largest E needs at least {MIN_STEPS} steps, got {self.min_steps}")
        return self

    def epochs_for(self, train_size: int) -> int:
        """Epochs that give the largest E at least ``min_steps`` steps (whole steps per epoch)."""
        largest = max(s.largest_examples for s in self.settings)
        per_epoch = train_size // largest
        if per_epoch < 1:
            raise ConfigError(f"one step of E = {largest} needs more than the {train_size} training examples")
        return math.ceil(self.min_steps / per_epoch)

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps``: a fraction of it, never under ``min_warmup``
        (nor over half the run)."""
        return min(max(self.min_warmup, math.ceil(self.warmup_fraction * total_steps)), total_steps // 2)


@dataclass(frozen=True)
class Section:
    """One section of the study: a task, its optimizer, the combiners it compares by name
    (``adasum`` and the baseline ``average``), and its readings (``tuned``, ``recipe``; see
    :mod:`adasum.lab.readings`). ``extends``: the section whose grid this one continues far
    above the critical batch (its own grid then starts at 16x ``b_crit``, not below it)."""

    name: str
    title: str
    task: str
    optimizer: str
    combiners: dict[str, Combiner]
    cpu: Scale
    gpu: Scale
    readings: tuple[str, ...] = ("tuned", "recipe")
    extends: str | None = None

    def task_at(self, scale: Scale) -> str:
        return scale.task or self.task

    def scale(self, name: str) -> Scale:
        if name not in SCALES:
            raise ConfigError(f"unknown scale {name!r} (choose from {', '.join(SCALES)})")
        return (self.cpu if name == "cpu" else self.gpu).check()


def _axis(low: float, steps: int) -> tuple[float, ...]:
    """``steps`` learning rates 2x apart from ``low``."""
    return tuple(float(f"{low * 2 ** k:.6g}") for k in range(steps))


#: Momentum SGD: Adasum of the gradients into one shared momentum, and Adasum of each worker's
#: own momentum step (delta mode: what Horovod's Adasum optimizer, which the paper used, does),
#: against the paper's baseline, the average of the gradients.
_GRADIENT = {"adasum": Combiner("adasum", "per-worker"), "adasum-delta": Combiner("adasum", "per-worker", "delta"),
             "average": Combiner("average", "examples")}
#: Adam and LAMB: Adasum of each worker's update (the paper), against prior work's baseline of
#: one optimizer on the averaged gradient.
_DELTA = {"adasum": Combiner("adasum", "none", "delta"), "average": Combiner("average", "sqrt-examples", "gradient")}
#: The same, with the earlier baseline kept as an ablation: the average of each worker's own step.
_DELTA_ABLATED = {**_DELTA, "average-delta": Combiner("average", "sqrt-examples", "delta")}

#: Adam and LAMB on teacher-mlp: the optimizer, B_crit at 0.80 (CPU scale) and at 0.85 (GPU
#: scale), and the one-worker rate (below).
_TEACHER_ADAPTIVE = (("adam", 790, 2635, 0.032), ("lamb", 736, 1638, 0.016))


def _teacher_gpu(b_crit: int, lr: float, large: bool = False) -> Scale:
    """The GPU scale of Adam and LAMB on teacher-mlp: to 32x B_crit at 0.85; ``large``: that
    grid continued from its largest E to 128x, by up to 1,024 workers (128 steps at the largest E)."""
    grid = critical_grid(b_crit, 256, span=32, max_workers=256)
    if not large:
        return Scale(grid, b_crit=b_crit, lrs=_axis(lr / 4, 8), base_lr=lr, reference=256, target=0.85,
                     samples=1 << 24)
    start = max(s.examples for s in grid)
    wide = tuple(s for s in critical_grid(b_crit, 256, span=128, max_workers=1024) if s.examples >= start)
    return Scale(wide, b_crit=b_crit, lrs=_axis(lr / 4, 8), base_lr=lr, reference=256, target=0.85,
                 samples=1 << 26)


#: Adam and LAMB on gauss-logistic: the optimizer, B_crit at 0.895 (CPU scale, the fit of the
#: medians of 3 seeds; docs/results/critical_batch.md) and the best constant rate of one worker
#: at 1,024 examples.
_GAUSS_ADAPTIVE = (("adam", 1687, 0.128), ("lamb", 3333, 0.016))


def _gauss_adaptive(optimizer: str, b_crit: int, lr: float) -> Section:
    """The Adam/LAMB claim on a second task, the convex Gaussian-mixture stream: E from below
    B_crit to 16x it (CPU) with 128 steps at the largest. The GPU scale's 0.90 is unmeasured for
    either optimizer: momentum's 4,370 stands in (an ESTIMATE)."""
    grid = critical_grid(b_crit, 256, span=16)
    return Section(
        f"gauss-logistic-{optimizer}", f"{optimizer}: Adasum of each worker's update against one {optimizer} on "
        "the averaged gradient, the gauss-logistic stream", "gauss-logistic", optimizer, _DELTA,
        cpu=Scale(grid, b_crit=b_crit, lrs=_axis(lr / 4, 6), base_lr=lr, reference=1024, target=0.895,
                  samples=MIN_STEPS * max(s.examples for s in grid)),
        gpu=Scale(critical_grid(4370, 256, span=32, max_workers=256), b_crit=4370, lrs=_axis(lr / 4, 8), base_lr=lr,
                  reference=1024, target=0.9, samples=1 << 25),
    )


# b_crit: the critical batch at the target, in examples. Measured ones say so; the others are
# ESTIMATES (marked) until `adasum noise` measures them: replace the number, and the grid, the
# budget and the readings follow.
SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section(
        "convex", "momentum SGD, 10-class logistic regression (the convex sanity check)", "logistic",
        "momentum", _GRADIENT,
        # ESTIMATE until `adasum noise` measures B_crit: B_simple (the smoothed noise scale of
        # `adasum simulate`) along 8 workers at E = 256, averaging, lr 0.1, 65,536 examples, was
        # 410 at score 0.79 and 540 at 0.82 (it grows as training goes on: 2,200 at 0.85).
        cpu=Scale(critical_grid(512, 32, span=16, accum=(4,)), b_crit=512, lrs=_axis(0.025, 6), base_lr=0.05,
                  reference=32, target=0.8, samples=65536),
        gpu=Scale(critical_grid(512, 32, span=32, max_workers=256, accum=(4,)), b_crit=512, lrs=_axis(0.025, 8),
                  base_lr=0.05, reference=32, target=0.8, samples=262144),
    ),
    Section(
        "momentum", "momentum SGD, residual GroupNorm CNN on augmented digits", "augdigits-resnet",
        "momentum", _GRADIENT,
        # CPU, target 0.80 on 8,192 samples: measured, B_crit 61 (S_min 39), the fit of the best
        # constant rate of E = 16-1,024 (docs/results/critical_batch.md; the earlier estimate from
        # B_simple was 32); per-worker batch 32, so E = 32-1,024 (0.5-17x); base_lr: the best
        # constant rate of one worker at 16-64 examples was 0.003-0.006. GPU, target 0.95:
        # measured on an H200, B_crit 93 [56-141] (S_min 83), the fit of the medians of 3 seeds
        # at the best constant rate of E = 64-16K; the best rates were 0.0125-0.025.
        cpu=Scale(critical_grid(61, 32, span=16), b_crit=61, lrs=_axis(0.00625, 6), base_lr=0.00625,
                  reference=32, target=0.8, samples=8192),
        gpu=Scale(critical_grid(93, 32, span=32, max_workers=256, accum=(4,)), b_crit=93, lrs=_axis(0.00625, 8),
                  base_lr=0.05, reference=32, target=0.95, samples=262144),
    ),
    *(Section(
        opt, f"{opt}: Adasum of each worker's update against one {opt} on the averaged gradient, "
        "byte-level transformer on the standard library", "stdlib-transformer", opt, _DELTA,
        # ESTIMATE until `adasum noise` measures B_crit, in windows of 64 bytes: B_simple along 8
        # workers at E = 64 (Adam on the averaged gradient, lr 3e-3, 4,096 windows) was 16-27 at
        # accuracy 0.37-0.38 and 45-65 at 0.39-0.40; the CPU target is 0.37, where B_crit is ~32.
        cpu=Scale(critical_grid(32, 8, span=16), b_crit=32, lrs=_axis(lr / 4, 5), base_lr=lr, reference=8,
                  target=0.37, samples=4096, evals_per_epoch=4),
        # The 3.3M-parameter transformer: 128 steps at E = 32 x 128 windows take 8 epochs of
        # 65,536 windows (the smallest E, 64, gets 8,192 steps). b_crit: a PLACEHOLDER.
        gpu=Scale(critical_grid(128, 16, span=32, max_workers=128), b_crit=128, lrs=_axis(lr / 8, 6), base_lr=lr,
                  reference=16, target=0.55, samples=65536, task="stdlib-transformer-large"),
    ) for opt, lr in (("adam", 3e-3), ("lamb", 1e-2))),
    Section(
        "elastic", "elastic training: momentum SGD, the worker count changed midway at the same "
        "learning rate", "augdigits-resnet", "momentum", {c: _GRADIENT[c] for c in ("adasum", "average")},
        # CPU: 1 -> 16 workers of 16, E = 16 -> 256 (B_crit / 4 to 4x the measured B_crit of 61),
        # after the first of 16 epochs of 2,048 samples, i.e. after 128 steps, when one worker is
        # about two thirds of the way to the target (S = S_min (1 + B_crit / E) is about 200 steps
        # at E = 16). Two earlier designs could not separate the combiners: 4 -> 16 after 32 steps
        # (averaging's best rate barely moved from E = 64 to 256, both at or above B_crit;
        # docs/results/study/elastic-4to16-cpu), and after 128 steps on 8,192 samples (every run
        # had reached the target before the change).
        cpu=Scale((Batching(1, 16), Batching(16, 16), Batching(1, 16, 1, 16, 1)), b_crit=61, lrs=_axis(0.003125, 6),
                  base_lr=0.00625, reference=16, target=0.8, samples=2048),
        # GPU: 2 <-> 16 workers of 32, E = 64 <-> 512 (0.7x to 5.5x the measured B_crit of 93), the
        # change after the first of 8 epochs of 8,192 samples: 128 steps at E = 64, where one
        # worker at 64 took 200-256 steps to 0.95 (docs/results/critical_batch.md).
        gpu=Scale((Batching(2, 32), Batching(16, 32), Batching(2, 32, 1, 16, 1), Batching(16, 32, 1, 2, 1)),
                  b_crit=93, lrs=_axis(0.00625, 8), base_lr=0.05, reference=32, target=0.95, samples=8192),
        readings=("tuned",),  # the elastic table is its reading
    ),
    # The generated streams: fresh examples at every step, critical batches in the thousands.
    # b_crit from the fit S = S_min (1 + B_crit / E) of tuned one-worker-equivalent runs at
    # E = 1K-64K (docs/results/critical_batch.md, `adasum noise`; CPU, one seed).
    Section(
        "gauss-logistic", "momentum SGD, logistic regression on a stream of a Gaussian mixture "
        "(Bayes accuracy 0.9025)", "gauss-logistic", "momentum", _GRADIENT,
        # Measured: B_crit 1,998 at 0.895 (S_min 34), 4,370 at 0.90 (S_min 40); best rates 6-30.
        cpu=Scale(critical_grid(1998, 256, span=16, accum=(4,)), b_crit=1998, lrs=_axis(1.5, 6), base_lr=3.0,
                  reference=256, target=0.895, samples=1 << 22),
        gpu=Scale(critical_grid(4370, 256, span=32, max_workers=256, accum=(4,)), b_crit=4370, lrs=_axis(1.5, 8),
                  base_lr=3.0, reference=256, target=0.9, samples=1 << 25),
    ),
    Section(
        "teacher-mlp", "momentum SGD, a student MLP learning a fixed random teacher MLP on a stream "
        "(Bayes accuracy 0.877)", "teacher-mlp", "momentum", _GRADIENT,
        # Measured: B_crit 963 at 0.80 (S_min 31), 2,454 at 0.85 (S_min 50); best rates 0.2-1.6.
        # The CPU scale takes 0.80: at 0.85 its largest E (64K) would cost ~400 s a run.
        cpu=Scale(critical_grid(963, 128, span=16), b_crit=963, lrs=_axis(0.1, 6), base_lr=0.2,
                  reference=128, target=0.8, samples=1 << 21),
        gpu=Scale(critical_grid(2454, 256, span=32, max_workers=256), b_crit=2454, lrs=_axis(0.1, 8),
                  base_lr=0.2, reference=256, target=0.85, samples=1 << 24),
    ),
    # The elastic claim on the same task: 2 -> 16 workers (E from B_crit / 4 to 2 B_crit, where
    # averaging's best rate grew 8x on the stream) after the first of 16 epochs of 16K examples, i.e. after
    # 64 steps, well before the 2-worker runs reach the target (150-250 steps). (After 128 steps,
    # the first try, every run was within 10 steps of the target at the change.)
    Section(
        "teacher-mlp-elastic", "elastic training: momentum SGD on teacher-mlp (16K examples), 2 -> 16 workers "
        "after 64 steps at the same learning rate", "teacher-mlp", "momentum",
        {c: _GRADIENT[c] for c in ("adasum", "average")},
        cpu=Scale((Batching(2, 128), Batching(16, 128), Batching(2, 128, 1, 16, 1)), b_crit=963, lrs=_axis(0.1, 6),
                  base_lr=0.2, reference=128, target=0.8, samples=1 << 14),
        gpu=Scale((Batching(8, 256), Batching(64, 256), Batching(8, 256, 1, 64, 1)), b_crit=2454,
                  lrs=_axis(0.1, 8), base_lr=0.2, reference=256, target=0.85, samples=1 << 17),
        readings=("tuned",),  # the elastic table is its reading
    ),
    # Adam and LAMB on the same stream: the paper's BERT claim on a task whose critical batch the
    # CPU can cross. Measured at 0.80 (gradient mode, constant rate, one seed; fit of the best
    # rate per E at E = 256-64K, docs/results/critical_batch.md): Adam B_crit 790 (S_min 24),
    # LAMB 736 (S_min 55). At the GPU scale's 0.85 (measured on an H200, medians of 3 seeds):
    # Adam 2,635 [2,116-3,590] (S_min 41), LAMB 1,638 [1,399-2,395] (S_min 116).
    # base_lr: the best constant rate of one worker at 256 examples (CPU, 0.80).
    *(Section(
        f"teacher-mlp-{opt}", f"{opt}: Adasum of each worker's update against one {opt} on the averaged "
        "gradient, the teacher-mlp stream", "teacher-mlp", opt, _DELTA_ABLATED,
        cpu=Scale(critical_grid(b_crit, 128, span=16), b_crit=b_crit, lrs=_axis(lr / 4, 6), base_lr=lr,
                  reference=256, target=0.8, samples=1 << 21),
        gpu=_teacher_gpu(gpu_b_crit, lr),
    ) for opt, b_crit, gpu_b_crit, lr in _TEACHER_ADAPTIVE),
    # Far above the critical batch, 20-90x: averaging's square-root rule still reaches the target
    # at the sections' largest E (16x), so their recipe reading has no E beyond E*. Workers up to
    # 512 at 128 examples each, 8M fresh examples (128 steps at 64K). A section of its own: a
    # larger budget in the sections above would put their small E's crossings inside the warm-up.
    *(Section(
        f"teacher-mlp-{opt}-large", f"{opt} far above the critical batch: Adasum of each worker's update "
        f"against one {opt} on the averaged gradient, the teacher-mlp stream", "teacher-mlp", opt, _DELTA,
        cpu=Scale(tuple(s for s in critical_grid(b_crit, 128, span=64, max_workers=512) if s.examples >= 16384),
                  b_crit=b_crit, lrs=_axis(lr / 4, 6), base_lr=lr, reference=256, target=0.8, samples=1 << 23),
        gpu=_teacher_gpu(gpu_b_crit, lr, large=True), extends=f"teacher-mlp-{opt}",
    ) for opt, b_crit, gpu_b_crit, lr in _TEACHER_ADAPTIVE),
    *(_gauss_adaptive(*spec) for spec in _GAUSS_ADAPTIVE),
    # The noisy quadratic model, the harness's check: B_crit 78 at 0.98 is exact, the fit of the
    # expected steps at the best constant rate of E = 8-16K (adasum.lab.quadratic.expected_critical,
    # S_min 26); fresh examples, one epoch, 128 steps at the largest E; seconds a run.
    Section(
        "nqm", "momentum SGD, the noisy quadratic model (Zhang et al. 2019; its critical batch is known exactly)",
        "nqm", "momentum", _GRADIENT,
        cpu=Scale(critical_grid(78, 8, span=16), b_crit=78, lrs=_axis(0.025, 7), base_lr=0.025, reference=8,
                  target=0.98, samples=MIN_STEPS * 2048),
        gpu=Scale(critical_grid(78, 8, span=32, max_workers=256), b_crit=78, lrs=_axis(0.025, 7), base_lr=0.025,
                  reference=8, target=0.98, samples=MIN_STEPS * 4096),
    ),
)}


def _far_above(base: Section) -> Section:
    """``base``'s grid continued from its largest E, by up to 512 (CPU) or 1,024 (GPU) workers of
    the same batch, to 64x (CPU) or 128x (GPU) its b_crit, with 128 steps at the new largest E;
    everything else as ``base``. Their own averaging baselines put the critical batch 1.4-3.3x
    above the grids' b_crit (each section's tuned.md), so the base grids reach only 5-12x it."""
    def continued(scale: Scale, span: int, max_workers: int) -> Scale:
        start = max(s.examples for s in scale.settings)
        grid = tuple(s for s in critical_grid(scale.b_crit, scale.settings[0].batch, span=span, max_workers=max_workers)
                     if s.examples >= start)
        return replace(scale, settings=grid, samples=MIN_STEPS * max(s.examples for s in grid))

    optimizer = base.title.partition(",")[0]  # the base title's own words for it ("momentum SGD")
    return Section(f"{base.name}-large", f"{optimizer} far above the critical batch, the {base.task} stream",
                   base.task, base.optimizer, base.combiners, cpu=continued(base.cpu, 64, 512),
                   gpu=continued(base.gpu, 128, 1024), extends=base.name)


SECTIONS.update((s.name, s) for s in map(_far_above, (SECTIONS["teacher-mlp"], SECTIONS["gauss-logistic"])))
