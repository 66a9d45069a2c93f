"""Handles of asynchronous operations: ``poll`` and ``synchronize``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

__all__ = ["Handle", "HorovodInternalError", "synchronize", "poll"]


class HorovodInternalError(RuntimeError):
    """A collective failed after it started (a peer died or the process group timed out).
    Elastic training scripts catch this name."""


class Handle:
    """An operation in flight: torch.distributed's works, and what turns their buffers into
    the result once they are done (unpacking, averaging, scaling, decompression).

    Operations that cannot run in the background here (Adasum, whose algorithm is a sequence
    of exchanges driven by this thread, and the agreement every operation starts with) have
    finished when their handle is returned.
    """

    __slots__ = ("_works", "_finish", "_result", "_done")

    def __init__(self, works: Sequence[dist.Work | Handle], finish: Callable[[], Any]) -> None:
        self._works = list(works)
        self._finish: Callable[[], Any] | None = finish
        self._result: Any = None
        self._done = False

    def poll(self) -> bool:
        """Whether :meth:`wait` would return without blocking."""
        return self._done or all(w.is_completed() for w in self._works)

    is_completed = poll  # a handle may wait on other handles as on torch works

    def wait(self) -> Any:
        """The operation's result, after waiting for it (within the process group's timeout).
        Calling it again returns the same result."""
        if not self._done:
            try:
                for w in self._works:
                    w.wait()
            except HorovodInternalError:
                raise  # from a handle this one waits on
            except RuntimeError as e:
                raise HorovodInternalError(str(e)) from e
            assert self._finish is not None, "only a handle that is done drops its finish"
            self._result = self._finish()
            self._done, self._works, self._finish = True, [], None
        return self._result


def _check(handle: object) -> Handle:
    if not isinstance(handle, Handle):
        raise TypeError(f"adasum.horovod: expected a handle from an *_async operation, got {type(handle).__name__}")
    return handle


def synchronize(handle: Handle) -> Any:
    """Wait for an asynchronous operation and return its result (the output tensor, a list of
    them for grouped operations, or ``(output, received_splits)`` for alltoall with splits)."""
    return _check(handle).wait()


def poll(handle: Handle) -> bool:
    """Whether the operation has finished, so that :func:`synchronize` will not block."""
    return _check(handle).poll()
