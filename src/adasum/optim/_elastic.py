r"""Per-rank optimizer state across a change of world size (elastic training).

In delta mode (:class:`adasum.optim.DistributedOptimizer`, :class:`adasum.optim.LocalSGD`) every
rank's optimizer has its own state (Adam's moments of its own gradients). A checkpoint keeps all
N of them; a run resumed on M ranks maps them by one rule:

.. math::

    \mathrm{state}'_r = \mathrm{state}_{r \bmod N}, \qquad r = 0, \ldots, M - 1

When the world shrinks (M < N) the states of old ranks M..N-1 are dropped; when it grows, the
new ranks copy the states of the first old ones. Every state is one rank's real history, the
step counts stay those of the run (Adam's bias correction continues), and nothing is averaged:
an average of moments is no rank's moments, and averaging would change the second moment's
scale where the ranks' gradients differ. With M = N every rank gets its own state back. The
simulator (``adasum simulate``) and ``adasum train`` follow the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["rank_state", "gather_states", "save_atomically"]

T = TypeVar("T")


def rank_state(states: Sequence[T], rank: int) -> T:
    """The saved state that rank ``rank`` of the new world continues from: that of old rank
    ``rank mod len(states)`` (see the module docstring). It is the saved object itself: ranks
    ``r`` and ``r + len(states)`` get the same one, so a process that loads it into several
    optimizers copies it first (``load_state_dict`` keeps the tensors it is given)."""
    if not states:
        raise ValueError("no saved states to resume from")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return states[rank % len(states)]


def gather_states(state: Any, group: dist.ProcessGroup | None = None, dst: int = 0) -> list[Any] | None:
    """Every rank's ``state`` in group-rank order, on group rank ``dst`` (None on the others);
    every rank of ``group`` calls it."""
    size, mine = dist.get_world_size(group), dist.get_rank(group)
    states: list[Any] | None = [None] * size if mine == dst else None
    dist.gather_object(state, states, group=group, group_dst=dst)
    return states


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` such that a writer killed at any moment leaves the previous
    file whole: write a temporary file next to it, make it reach the disk, rename it over
    ``path`` (readers see the old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
