"""The language-modelling task: a byte-level transformer (:class:`adasum.lab.models.ByteTransformer`)
trained on source text, by default the ``.py`` files of the running interpreter's standard
library, the analogue of the paper's BERT on data every machine has and nobody here wrote.

The files are split into training and validation by file, not by position, so the validation
text is code the model never saw a line of. A file goes to validation when the CRC-32 of its
path (relative to the corpus root) falls in one of ``_BUCKETS`` buckets: the split of a file
does not depend on which other files exist, and the same Python version gives the same split on
every machine. Each side is the concatenation of its files in path order, a NUL byte after each
file (NUL never occurs in text, so it is an unambiguous end of file).

A training example is a window of ``context + 1`` bytes (inputs and, shifted by one, targets);
the windows tile the training stream without overlap, and the step plan draws them in a fresh
random order every epoch. ``samples`` keeps that many windows, evenly spread over the stream.
The validation set is a fixed set of windows evenly spread over the validation stream; the
score is next-byte accuracy and the evaluation also reports bits per byte (the loss in bits).

``--data DIR`` trains on another directory: every file under it that is not hidden and holds
no NUL byte (git's test for text), in any language or encoding, since the model reads bytes.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from adasum.lab.models import ByteTransformer
from adasum.lab.task import Task, TaskError

__all__ = ["TEXT_TASKS", "TextTask", "TransformerSize", "SIZES", "text_task", "corpus_files", "stdlib_root"]


@dataclass(frozen=True)
class TransformerSize:
    width: int
    layers: int
    heads: int
    context: int


#: The model of each text task: a CPU-scale one (about 0.46M parameters) and a GPU-scale one
#: (about 3.3M).
SIZES = {
    "stdlib-transformer": TransformerSize(width=128, layers=2, heads=4, context=64),
    "stdlib-transformer-large": TransformerSize(width=256, layers=4, heads=8, context=128),
}
#: The text tasks, one per model size.
TEXT_TASKS = tuple(SIZES)
#: One file in ``_BUCKETS`` (by the hash of its path) is validation text: about 6%.
_BUCKETS = 16
#: Validation windows: enough for a loss estimate good to about 1%, few enough to evaluate
#: many times per epoch.
_EVAL_WINDOWS = 256
_EVAL_BATCH = 64
#: Directories under the standard library that hold installed third-party packages.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True, eq=False)
class TextTask(Task):
    """Windows of a byte stream. ``starts`` are the training windows' offsets in ``stream``,
    ``validation`` the validation windows, ``[windows, context + 1]`` bytes."""

    name: str
    size: TransformerSize
    stream: torch.Tensor
    starts: torch.Tensor
    validation: torch.Tensor
    files: tuple[int, int]  # training and validation files, for the record
    kind: str = "language"

    @property
    def train_size(self) -> int:
        return len(self.starts)

    def examples(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(self.size.context + 1, device=self.stream.device)
        windows = self.stream[self.starts[index.to(self.stream.device)].unsqueeze(-1) + offsets].long()
        return windows[..., :-1], windows[..., 1:]

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for windows in self.validation.split(_EVAL_BATCH):
            windows = windows.long()
            yield windows[:, :-1], windows[:, 1:]

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        s = self.size
        return ByteTransformer(s.width, s.layers, s.heads, s.context)

    def to(self, device: torch.device) -> TextTask:
        if self.stream.device == device:
            return self
        return replace(self, stream=self.stream.to(device), starts=self.starts.to(device),
                       validation=self.validation.to(device))


def stdlib_root() -> Path:
    """Where the running interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, python_only: bool) -> list[Path]:
    """The corpus under ``root`` in path order: its ``.py`` files outside installed packages
    (``python_only``, for the standard library), or every visible file that holds no NUL byte."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (python_only and d in _NOT_STDLIB))
        for name in names:
            path = Path(folder, name)
            if name.startswith(".") or not path.is_file():
                continue
            if python_only and path.suffix != ".py":
                continue
            found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def _is_validation(relative: str) -> bool:
    return zlib.crc32(relative.encode()) % _BUCKETS == 0


@functools.lru_cache(maxsize=2)
def _read(root: Path, python_only: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The training and validation streams of the corpus under ``root`` (read once per process:
    the standard library is some 30 MB)."""
    sides: dict[bool, list[bytes]] = {False: [], True: []}
    for path in corpus_files(root, python_only):
        try:
            text = path.read_bytes()
        except OSError:  # unreadable (permissions, a dangling entry): not part of the corpus
            continue
        if b"\0" in text or not text:
            continue
        sides[_is_validation(path.relative_to(root).as_posix())].append(text + b"\0")
    if not sides[True] and len(sides[False]) > 1:
        # A small corpus whose paths all hash to training: its last file validates.
        sides[True].append(sides[False].pop())
    streams = [torch.frombuffer(bytearray(b"".join(sides[v])), dtype=torch.uint8) if sides[v]
               else torch.zeros(0, dtype=torch.uint8) for v in (False, True)]
    return streams[0], streams[1], (len(sides[False]), len(sides[True]))


def text_task(name: str, data: str | None = None, samples: int | None = None) -> TextTask:
    """Text task ``name`` on the standard library, or on the text files under ``data``;
    ``samples`` training windows (default: every window of the training stream)."""
    size = SIZES[name]
    if data is None:
        root, python_only = stdlib_root(), True
    else:
        root, python_only = Path(data).resolve(), False
        if not root.is_dir():
            raise TaskError(f"--data {data!r} for task {name!r} must be a directory of text files")
    train, validation, files = _read(root, python_only)
    span = size.context + 1
    windows = (len(train) - 1) // size.context
    if windows < 1 or len(validation) < span:
        raise TaskError(f"the text under {str(root)!r} is too short for task {name!r}: it needs at "
                        f"least two files with {span} bytes each for training and validation")
    # The last window ends at most at the stream's last byte: windows * context + 1 <= len.
    keep = windows if samples is None else min(samples, windows)
    starts = (torch.arange(keep) * windows // keep) * size.context
    count = min(_EVAL_WINDOWS, len(validation) // span)
    first = torch.arange(count) * ((len(validation) - span) // max(1, count - 1))
    held_out = validation[first.unsqueeze(-1) + torch.arange(span)]
    return TextTask(name, size, train, starts, held_out, files)
