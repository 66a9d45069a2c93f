"""A background thread for reductions that overlap the backward pass.

The DDP hook and the overlapped delta-mode optimizer hand buckets to one thread while backward
goes on. The thread talks over a process group of its own (the reducer's ranks, backend and
timeout), so its messages never interleave with those the calling thread sends on the reducer's
group (the agreement rounds, DDP's own traffic, the training loop's). It has one worker: jobs
run in the order they were submitted, which every rank does alike, and that keeps the ranks'
messages paired.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch.distributed as dist

from adasum._groups import new_group_like
from adasum._reducer import Reducer

__all__ = ["Background"]

T = TypeVar("T")


class Background:
    """Runs jobs ``job(worker)`` on one thread, ``worker`` being ``reducer`` on the thread's own
    group. The group and the thread are made by the first :meth:`submit`, which every member
    of the reducer's group must reach at the same point (as a collective)."""

    __slots__ = ("reducer", "_name", "_group", "_worker", "_executor")

    def __init__(self, reducer: Reducer, name: str) -> None:
        self.reducer = reducer
        self._name = name
        self._group: dist.ProcessGroup | None = None
        self._worker: Reducer | None = None
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, job: Callable[[Reducer], T]) -> Future[T]:
        """Queue ``job`` behind those submitted before; its future holds its result or error."""
        if self._executor is None:
            if self._group is None:
                # Only the members call this for a subgroup; every rank does for the world.
                self._group = new_group_like(self.reducer.group, local=not self._spans_world())
            self._worker = self.reducer.with_group(self._group)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        assert self._worker is not None
        return self._executor.submit(job, self._worker)

    def close(self) -> None:
        """Finish the queued jobs, end the thread and free the worker's buffers; destroy the
        group where that is safe (below). A later :meth:`submit` starts the thread again."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._group is not None and self._spans_world():
            # A group over every rank was made collectively and has a name never used again. A
            # subgroup's name is a hash that a new group of the same ranks could repeat after a
            # destroy (and then meet the old group's addresses), so it is kept for reuse.
            dist.destroy_process_group(self._group)
            self._group = None

    def _spans_world(self) -> bool:
        return dist.get_world_size(self.reducer.group) == dist.get_world_size()
