"""Tasks whose data are arrays in memory: scikit-learn's bundled digits (1,797 8x8 images),
synthetic linear and multinomial logistic regression (drawn from a fixed teacher, so the
problem does not change with the run's seed), and the user's own ``.npz`` / ``.csv`` file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adasum.lab.models import build_model
from adasum.lab.task import DATA_SEED, Task, TaskError

__all__ = ["ArrayTask", "DIGITS_TASKS", "SYNTHETIC_TASKS", "digits_task", "synthetic_task", "file_task"]

_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class ArrayTask(Task):
    """A dataset held as tensors, split into train and test, and the model family that learns it."""

    name: str
    kind: str  # "classification" or "regression"
    model: str  # "mlp", "cnn" or "linear"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def outputs(self) -> int:
        return int(self.y_train.max().item()) + 1 if self.kind == "classification" else 1

    @property
    def train_size(self) -> int:
        return len(self.x_train)

    def examples(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.x_train.device)
        return self.x_train[index], self.y_train[index]

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One batch: R^2 is not a mean over examples, so it cannot be assembled from batches.
        yield self.x_test, self.y_test

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.model, self.x_train.shape[1], self.outputs)

    def to(self, device: torch.device) -> ArrayTask:
        if self.x_train.device == device:
            return self
        return replace(self, **{k: getattr(self, k).to(device)
                                for k in ("x_train", "y_train", "x_test", "y_test")})


def _split(name: str, kind: str, model: str, x: np.ndarray, y: np.ndarray) -> ArrayTask:
    """A fixed random 80/20 split."""
    perm = np.random.default_rng(DATA_SEED).permutation(len(x))
    n_test = max(1, int(round(len(x) * _TEST_FRACTION)))
    test, train = perm[:n_test], perm[n_test:]
    return _make(name, kind, model, x[train], y[train], x[test], y[test])


def _make(name, kind, model, x_train, y_train, x_test, y_test) -> ArrayTask:
    label_dtype = torch.int64 if kind == "classification" else torch.float32
    return ArrayTask(
        name, kind, model,
        torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=label_dtype),
        torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test, dtype=label_dtype),
    )


#: The digits tasks, by the model each trains.
DIGITS_TASKS = ("digits-mlp", "digits-cnn")


def digits_task(name: str) -> ArrayTask:
    """The digits, split 80/20 with :data:`DATA_SEED`, for a model of ``name``'s suffix."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixels are 0..16; scaling to 0..1 keeps the default learning rates sensible.
    return _split(name, "classification", name.split("-")[1], digits.data / 16.0, digits.target)


#: Features and classes (0: regression) of the synthetic tasks.
_SYNTHETIC = {"linear": (32, 0), "logistic": (64, 10)}
SYNTHETIC_TASKS = tuple(_SYNTHETIC)


def synthetic_task(name: str, samples: int | None, copies: int = 1) -> ArrayTask:
    """Task ``name`` of :data:`SYNTHETIC_TASKS` with ``samples`` training examples (default
    16384), refused when ``copies`` of it would not fit in this machine's memory."""
    samples = samples or 16384
    _check_memory(name, samples, copies)
    try:
        return _synthetic(name, samples)
    except MemoryError:  # the machine has the memory, but others hold it
        raise TaskError(f"not enough free memory for --samples {samples} of task {name!r}") from None


def _test_size(samples: int) -> int:
    return max(1024, samples // 4)


def _check_memory(name: str, samples: int, copies: int) -> None:
    """Refuse a synthetic task larger than this machine's memory before drawing it: an
    overcommitting kernel lets numpy allocate it, and kills the process (or one of the
    workers) later."""
    d, classes = _SYNTHETIC[name]
    # Peak bytes per example while drawing: the float64 features and their float32 copy, and
    # for classification the teacher's float64 logits, probabilities and cumulative sums.
    each = (samples + _test_size(samples)) * (12 * d + 24 * classes)
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if copies * each > have:
        workers = f" in each of {copies} workers" if copies > 1 else ""
        raise TaskError(f"--samples {samples} of task {name!r} needs about {each / 2**30:.1f} GiB"
                        f"{workers}; this machine has {have / 2**30:.1f} GiB")


def _synthetic(name: str, samples: int) -> ArrayTask:
    """Linear regression (32 features, noise 0.5) or 10-class logistic regression (64
    features); the test set has a quarter as many examples, at least 1,024."""
    rng = np.random.default_rng(DATA_SEED)
    n_test = _test_size(samples)
    d, classes = _SYNTHETIC[name]
    if name == "linear":
        w = rng.standard_normal(d) / np.sqrt(d)
        x = rng.standard_normal((samples + n_test, d))
        y = x @ w + 0.5 * rng.standard_normal(samples + n_test)
        kind, model = "regression", "linear"
    else:
        w = rng.standard_normal((d, classes)) * (8.0 / np.sqrt(d))
        x = rng.standard_normal((samples + n_test, d))
        logits = x @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        # Labels are drawn from the teacher's softmax, so even the teacher is not 100% right.
        y = (p.cumsum(1) > rng.random((len(x), 1))).argmax(1)
        kind, model = "classification", "linear"
    return _make(name, kind, model, x[:samples], y[:samples], x[samples:], y[samples:])


def file_task(path: Path) -> ArrayTask:
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".npz":
        x, y, test = _read_npz(path)
    elif path.suffix == ".csv":
        (x, y), test = _read_csv(path), None
    else:
        raise TaskError(f"data file {str(path)!r} must end in .npz or .csv")
    kind = _kind_of(y if test is None else np.concatenate([y, test[1]]))
    model = "mlp" if kind == "classification" else "linear"
    if test is None:
        return _split(path.name, kind, model, x, y)
    return _make(path.name, kind, model, x, y, *test)


def _read_npz(path: Path):
    """Arrays ``x`` and ``y`` (features [n, d], labels [n]), optionally ``x_test``, ``y_test``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # numpy raises several types for a file that is not an archive
        raise TaskError(f"cannot read {str(path)!r} as .npz: {e}") from None
    if "x" not in arrays or "y" not in arrays:
        raise TaskError(f"{str(path)!r} needs arrays 'x' and 'y', has {sorted(arrays)}")
    x, y = _checked(path, arrays["x"], arrays["y"])
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise TaskError(f"{str(path)!r} must have both 'x_test' and 'y_test' or neither")
    if "x_test" in arrays:
        xt, yt = _checked(path, arrays["x_test"], arrays["y_test"])
        if xt.shape[1] != x.shape[1]:
            raise TaskError(f"{str(path)!r}: x_test has {xt.shape[1]} features, x has {x.shape[1]}")
        return x, y, (xt, yt)
    return x, y, None


def _read_csv(path: Path):
    """Numbers only, the last column is the label; a first row that is not numeric is a header."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]
    if not rows:
        raise TaskError(f"{str(path)!r} has no data rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or widths.pop() < 2:
        raise TaskError(f"{str(path)!r}: every row needs the same number (>= 2) of columns")
    bad = next((i for i, r in enumerate(rows) if not _numeric(r)), None)
    if bad is not None:
        raise TaskError(f"{str(path)!r}: row {bad + 1} of the data is not all numbers")
    table = np.asarray(rows, dtype=np.float64)
    return _checked(path, table[:, :-1], table[:, -1])


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def _checked(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features as float32 (what the model sees) and the labels, or TaskError."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) < 2 or x.shape[1] < 1:
        raise TaskError(
            f"{str(path)!r}: need features [n, d] and labels [n] with n >= 2 and d >= 1, "
            f"got {x.shape} and {y.shape}"
        )
    # Integers and reals only: casting complex numbers would silently drop the imaginary part.
    if x.dtype.kind not in "iuf" or y.dtype.kind not in "iuf":
        raise TaskError(f"{str(path)!r}: features and labels must be real numbers, "
                        f"got {x.dtype} and {y.dtype}")
    # Checked after the cast: a finite 1e39 becomes inf in float32 (regression labels are
    # cast too), and the run would be NaN from its first step. The refusal says so; numpy's
    # overflow warning would only repeat it.
    with np.errstate(over="ignore"):
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
    if not (np.isfinite(x32).all() and np.isfinite(y32).all()):
        raise TaskError(f"{str(path)!r}: features and labels must be finite in float32 "
                        f"(|value| < 3.4e38, no NaN or inf)")
    return x32, y


def _kind_of(y: np.ndarray) -> str:
    """Non-negative whole-number labels (at most 1,000 classes) mean classification."""
    whole = np.issubdtype(y.dtype, np.integer) or bool(np.all(y == np.round(y)))
    if whole and y.min() >= 0 and y.max() < 1000:
        return "classification"
    return "regression"
