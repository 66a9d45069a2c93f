"""The task registry: every task of the lab by name, and :func:`load_task`, which builds one.

Every task fits in memory and needs no download: the array tasks (:mod:`adasum.lab.arrays`:
scikit-learn's digits, synthetic linear and logistic regression, the user's ``.npz`` /
``.csv`` file), streams of millions of fresh generated examples whose critical batch is in the
thousands (:mod:`adasum.lab.synthetic`), and two tasks of the paper's kind on data every
machine has: a byte-level transformer on the source of Python's standard library
(:mod:`adasum.lab.text`) and a residual CNN on digits under random affine transformations
(:mod:`adasum.lab.images`). Each module builds on :class:`adasum.lab.task.Task`; this one only
names them.
"""

from __future__ import annotations

from pathlib import Path

from adasum.lab.arrays import DIGITS_TASKS, SYNTHETIC_TASKS, digits_task, file_task, synthetic_task
from adasum.lab.images import IMAGE_TASKS, augmented_digits
from adasum.lab.quadratic import NQM_TASKS, nqm_task
from adasum.lab.synthetic import STREAM_TASKS, stream_task
from adasum.lab.task import Task, TaskError
from adasum.lab.text import TEXT_TASKS, text_task

__all__ = ["TASKS", "load_task"]

TASKS = (*DIGITS_TASKS, *SYNTHETIC_TASKS, "file", *TEXT_TASKS, *IMAGE_TASKS, *STREAM_TASKS, *NQM_TASKS)


def load_task(name: str, data: str | None = None, samples: int | None = None, copies: int = 1) -> Task:
    """Build task ``name``; ``data`` is the file for the ``file`` task (a directory of text for
    the text tasks), ``samples`` the size of a synthetic training set, ``copies`` how many
    processes of this machine will build it (each worker holds its own). Raises
    :class:`~adasum.lab.task.TaskError` on anything the user can fix."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    if samples is not None and samples < 1:
        raise TaskError(f"--samples must be at least 1, got {samples}")
    if name == "file":
        if data is None:
            raise TaskError("task 'file' needs --data PATH (.npz or .csv)")
        return file_task(Path(data))
    if name in TEXT_TASKS:
        return text_task(name, data, samples)
    if data is not None:
        raise TaskError(f"--data is only for task 'file' (a data file) and the text tasks "
                        f"(a directory of text), not {name!r}")
    if name in IMAGE_TASKS:
        return augmented_digits(name, samples)
    if name in STREAM_TASKS:
        return stream_task(name, samples)
    if name in NQM_TASKS:
        return nqm_task(samples)
    if name in DIGITS_TASKS:
        return digits_task(name)
    return synthetic_task(name, samples, copies)
