"""Rank ``src``'s tensors on every rank of a group, once the ranks agree on what they pass.

A broadcast of tensors whose sizes differ between ranks is not something a backend refuses
cleanly: Gloo aborts the process (SIGABRT) on a size mismatch, and the other ranks then wait
for their timeout. So the ranks first run the agreement every reduction runs
(:func:`adasum._check.agree`): one round of small messages on the layout (shapes and dtypes in
order) and ``src``. On a difference every rank raises the same ValueError, and no data moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum._check import Problem, agree
from adasum._groups import message_device
from adasum._layout import Layout

__all__ = ["broadcast"]


def broadcast(tensors: Sequence[torch.Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite every rank's ``tensors`` (of any dtype) in place with those of rank ``src``
    of ``group``; the same ValueError on every rank, before any data moves, if the ranks pass
    different shapes, dtypes, numbers of tensors or ``src``."""
    tensors = list(tensors)
    world = dist.get_world_size(group)
    # Every rank sees an out-of-range src alike; through agree() it gets the same words.
    problem = None if 0 <= src < world else Problem(ValueError, f"src={src} is not a rank of this group of {world}")
    layout = None if problem else Layout.of(tensors)
    agree(group, problem, layout, (("src", src),), message_device(group))
    root = src if group is None else dist.get_global_rank(group, src)
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=root, group=group)
