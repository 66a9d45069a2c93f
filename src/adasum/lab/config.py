"""What one training run is: the options ``adasum train`` and ``adasum simulate`` share, their
validation, and the schedule of steps, evaluations and learning rates both follow.

Both programs walk the same plan so that a simulated run and a real one with the same seed see
the same examples in the same order, step for step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import torch

import adasum

__all__ = [
    "REDUCERS", "OPTIMIZERS", "DELTA_MODE", "MODES", "SCHEDULES", "OUTER_OPTIMIZERS",
    "ConfigError", "RunConfig", "Origin", "Steps", "make_reducer",
]

#: The reducers a run can use, by the name the options and the summaries give them. Real
#: training and the simulator both build theirs here, so a name means the same code in both.
REDUCERS: dict[str, type[adasum.Reducer]] = {
    cls.name: cls for cls in (adasum.Adasum, adasum.Average, adasum.Sum)
}
OPTIMIZERS = ("sgd", "momentum", "adam", "lamb")
#: Optimizers whose parameter updates (not gradients) are reduced by default, as in the paper.
DELTA_MODE = frozenset({"adam", "lamb"})
#: What a run reduces: ``gradient`` (the reduced gradient feeds one optimizer step, the same on
#: every worker) or ``delta`` (each worker steps its own optimizer, the updates are reduced).
#: Every optimizer runs in either: Adam or LAMB in gradient mode is prior work's baseline (one
#: optimizer on the averaged gradient), momentum in delta mode is Horovod's update mode.
MODES = ("gradient", "delta")
SCHEDULES = ("constant", "cosine", "linear")
#: Outer optimizers of local SGD (:class:`adasum.optim.LocalSGD`), see
#: :func:`adasum.lab.optimizers.make_outer`.
OUTER_OPTIMIZERS = ("sgd", "nesterov")
#: The largest seed: each epoch's data order is drawn from ``seed * 1_000_003 + epoch``, which
#: must stay within what ``torch.Generator.manual_seed`` takes (64 bits).
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """An option value no run can use."""


def _option(default, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None):
    """A field of :class:`RunConfig` that is also a command-line option: its help text, its
    choices, and its flag where that is not ``--`` and the name (read by
    :mod:`adasum.lab.options`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class RunConfig:
    """One run. ``batch`` is per worker and per micro-batch; a worker accumulates ``accum``
    micro-batches before the workers reduce, so a step consumes workers x batch x accum
    examples (the paper's "examples before communication")."""

    task: str = _option("digits-mlp", "the task: model and data (see adasum.lab.tasks)")
    data: str | None = _option(None, "a .npz (arrays x, y, optionally x_test, y_test) or .csv (last column = "
                                     "label) for --task file; a directory of text for the stdlib-transformer "
                                     "tasks (default: the standard library's .py files)")
    samples: int | None = _option(None, "training examples of a synthetic task (default 16384), of "
                                        "augdigits-resnet (default 65536), of gauss-logistic, teacher-mlp and nqm "
                                        "(default 4194304), windows of a text task (default all)")
    reducer: str = _option("adasum", "how the workers' gradients (or updates) are combined", choices=tuple(REDUCERS))
    optimizer: str = _option("momentum", "the optimizer each worker steps", choices=OPTIMIZERS)
    #: ``gradient`` or ``delta`` (see :data:`MODES`); None: the optimizer's default
    #: (:data:`DELTA_MODE`). Kept None rather than filled in, so that a stored run or a
    #: checkpoint of an earlier version still names the same configuration.
    mode: str | None = _option(None, "reduce the gradients (one optimizer step on the reduced gradient) or each "
                                     "worker's optimizer update (delta); default: gradient for sgd and momentum, "
                                     "delta for adam and lamb", choices=MODES)
    lr: float = _option(0.05, "learning rate (after warm-up, before the schedule's decay)")
    schedule: str = _option("constant", "learning-rate decay after the warm-up", choices=SCHEDULES)
    warmup: int = _option(0, "steps of linear learning-rate warm-up")
    batch: int = _option(32, "examples per worker per micro-batch")
    accum: int = _option(1, "micro-batches per worker before the workers reduce")
    epochs: int = _option(5, "passes over the training set")
    seed: int = _option(0, f"seed of the model's initial weights and the data order (0 to {MAX_SEED})")
    target: float | None = _option(None, "test score (accuracy, or R^2 for regression) to report steps and epochs "
                                         "to (default: none, and none reported)")
    evals_per_epoch: int = _option(8, "test evaluations per epoch")
    #: Further evaluations, this many per doubling of the step count (the first step at or
    #: after each 2^(j/8) for 8: every step up to 16, then 18, 20, 21, 23, ...): steps to the
    #: target are then measured to about the same relative precision early and late, where
    #: evaluations per epoch leave a small E's early crossing tens of steps apart. 0: none.
    evals_per_doubling: int = 0
    #: Local SGD (delta mode): every worker steps this many times on its own weights between
    #: reductions of the deltas. 1 with no outer optimizer: delta mode as it always was.
    sync_every: int = _option(1, "local SGD (delta mode): steps between reductions")
    #: DiLoCo: an optimizer of :data:`OUTER_OPTIMIZERS` steps on the negated reduced delta
    #: (None: the reduced delta is added), at learning rate ``outer_lr``.
    outer: str | None = _option(None, "DiLoCo (delta mode): an outer step on the reduced delta (default: none, "
                                      "the reduced delta is added)", choices=OUTER_OPTIMIZERS, flag="--outer-optimizer")
    outer_lr: float = _option(0.7, "the outer optimizer's learning rate")

    def validated(self) -> RunConfig:
        """Self, or ConfigError naming the first bad option."""
        if self.reducer not in REDUCERS:
            raise ConfigError(f"unknown reducer {self.reducer!r} (choose from {', '.join(REDUCERS)})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"the learning rate must be a positive number, got {self.lr}")
        for name in ("batch", "accum", "epochs", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise ConfigError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {self.seed}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.evals_per_doubling < 0:
            raise ConfigError(f"evaluations per doubling must be >= 0, got {self.evals_per_doubling}")
        if self.sync_every < 1:
            raise ConfigError(f"--sync-every must be at least 1, got {self.sync_every}")
        if self.outer is not None and self.outer not in OUTER_OPTIMIZERS:
            raise ConfigError(f"unknown outer optimizer {self.outer!r} (choose from {', '.join(OUTER_OPTIMIZERS)})")
        if not (self.outer_lr > 0 and math.isfinite(self.outer_lr)):
            raise ConfigError(f"the outer learning rate must be a positive number, got {self.outer_lr}")
        if self.local and not self.reduces_deltas:
            raise ConfigError("--sync-every and --outer-optimizer reduce deltas: they need delta mode (--mode delta)")
        if self.target is not None and not 0 < self.target <= 1:
            # Accuracy and R^2 are at most 1: a larger target can never be reached.
            raise ConfigError(f"the target score must be in (0, 1] (accuracy or R^2), got {self.target}")
        return self

    @property
    def reduces_deltas(self) -> bool:
        """Whether the workers' parameter updates are reduced (delta mode), not their gradients."""
        return self.optimizer in DELTA_MODE if self.mode is None else self.mode == "delta"

    @property
    def local(self) -> bool:
        """Whether the workers run local SGD (several local steps, or an outer optimizer)."""
        return self.sync_every > 1 or self.outer is not None

    def with_(self, **changes) -> RunConfig:
        return replace(self, **changes)

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of field ``name``: ``--`` and the name with dashes, unless
        the field declares another."""
        declared = next(f for f in fields(RunConfig) if f.name == name).metadata.get("flag")
        return declared or f"--{name.replace('_', '-')}"

    def differences(self, other: RunConfig) -> list[str]:
        """The options ``other`` sets otherwise, as ``--flag VALUE (this run: VALUE)`` with
        self's value first (``not set`` for None)."""
        def shown(value: object) -> str:
            return "not set" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

        return [f"{self.flag(f.name)} {shown(getattr(self, f.name))} (this run: {shown(getattr(other, f.name))})"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def as_dict(self) -> dict:
        """The options, those added after runs were stored (:data:`_LATER`) only where they
        differ from their defaults: a stored run's configuration, and the study's file names
        made from it, stay what they were."""
        options = asdict(self)
        for name, default in _LATER.items():
            if options[name] == default:
                del options[name]
        return options


#: Options newer than stored runs, and their defaults.
_LATER = {f.name: f.default for f in fields(RunConfig) if f.name in ("sync_every", "outer", "outer_lr")}


class Origin(NamedTuple):
    """Where a plan begins: ``step`` steps taken before it (by a run on another plan, resumed
    on this one), which had consumed ``examples`` examples and reached index ``offset`` of
    epoch ``epoch``'s order of examples."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    examples: int = 0


@dataclass(frozen=True)
class Steps:
    """The steps of a run of ``config`` with ``workers`` workers on ``train_size`` examples: how
    many, the examples each draws, and after which the test score is measured.

    A run resumed on another number of workers may take another number of examples per step
    (:mod:`adasum.lab.resume`): its plan begins at the checkpoint's ``origin``, finishes that
    epoch's order of examples from there in steps of its own size, and then takes whole epochs.
    The same order and the same step size give the same steps as the plan that wrote the
    checkpoint."""

    config: RunConfig
    workers: int
    train_size: int
    origin: Origin = Origin()

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"one step needs {self.per_step} examples (workers x batch x accum) but the "
                f"training set has {self.train_size}"
            )

    @property
    def per_worker(self) -> int:
        return self.config.batch * self.config.accum

    @property
    def per_step(self) -> int:
        return self.workers * self.per_worker

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.per_step

    @property
    def first_steps(self) -> int:
        """Steps of the origin's epoch: those left of its order from the origin's offset."""
        return (self.train_size - self.origin.offset) // self.per_step

    @property
    def total_steps(self) -> int:
        o = self.origin
        return o.step + self.first_steps + self.steps_per_epoch * (self.config.epochs - o.epoch - 1)

    def position(self, step: int) -> Origin:
        """Where the run stands after ``step`` steps (at least the origin's): what a
        checkpoint written then records, so that a run on another plan can continue."""
        o = self.origin
        taken = step - o.step
        examples = o.examples + taken * self.per_step
        if taken < self.first_steps:
            return Origin(step, o.epoch, o.offset + taken * self.per_step, examples)
        whole, index = divmod(taken - self.first_steps, self.steps_per_epoch)
        return Origin(step, o.epoch + 1 + whole, index * self.per_step, examples)

    def ends_epoch(self, step: int) -> bool:
        """Whether the ``step``-th step (1-based) is the last of an epoch."""
        return self.position(step).offset == 0

    def epoch_of(self, step: int) -> float:
        """Epochs of data consumed after ``step`` steps (an incomplete last step is dropped)."""
        return self.position(step).examples / self.train_size

    def evaluates_after(self, step: int) -> bool:
        """Whether the test score is measured after step ``step`` (1-based): a few times per
        epoch, ``evals_per_doubling`` times per doubling of the step count, and after the last
        step."""
        every = max(1, self.steps_per_epoch // self.config.evals_per_epoch)
        k = self.config.evals_per_doubling
        # Step s is a geometric point when some 2^(j/k) lies in (s - 1, s].
        geometric = k > 0 and (step == 1 or math.floor(k * math.log2(step)) > math.floor(k * math.log2(step - 1)))
        return step % every == 0 or step == self.total_steps or geometric

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """``[steps_per_epoch, per_step]`` example indices of epoch ``epoch``; worker r takes
        columns ``r * per_worker`` on, micro-batch k the ``batch`` columns after that."""
        return self._permutation(epoch)[: self.steps_per_epoch * self.per_step].view(self.steps_per_epoch, self.per_step)

    def _permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the examples, whatever the step size."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(self.train_size, generator=g)

    def batches(self, start: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step, example indices)`` for every 0-based step from ``start`` (default: the
        origin's) to the end."""
        first = self.origin.step if start is None else start
        if first < self.origin.step:
            raise ValueError(f"step {first} lies before the plan's origin at step {self.origin.step}")
        epoch, order = -1, torch.empty(0)
        for step in range(first, self.total_steps):
            here = self.position(step)
            if here.epoch != epoch:
                epoch, order = here.epoch, self._permutation(here.epoch)
            yield step, order[here.offset:here.offset + self.per_step]

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based step ``step``: linear warm-up, then the schedule's decay."""
        c = self.config
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        progress = (step - c.warmup) / max(1, self.total_steps - c.warmup)
        if c.schedule == "cosine":
            return c.lr * 0.5 * (1 + math.cos(math.pi * progress))
        if c.schedule == "linear":
            return c.lr * (1 - progress)
        return c.lr


def make_reducer(name: str) -> adasum.Reducer:
    """A fresh reducer ``name`` (see :data:`REDUCERS`) over the default process group."""
    return REDUCERS[name]()
