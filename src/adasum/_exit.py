"""Process groups torn down before the interpreter is, so that a finished job exits with 0.

A Gloo worker thread keeps its last collective (and the tensors it carried) until a moment
after the caller's ``wait`` has returned. When a script exits right after its last collective,
that moment can fall inside the interpreter's shutdown; if the thread then frees a tensor whose
Python object it owns, it must take the GIL, Python 3.11 makes such a thread exit, and C++ calls
``std::terminate``: "terminate called without an active exception", SIGABRT after the training
finished. A bare torch script (three Gloo ranks on two cores, 50 all-reduces, then exit) aborted
in 10 of 20 runs this way (docs/failures.md, "A finished job aborts at exit").

A group's destructor joins its worker threads; it runs when the group's last reference goes.
So, once, at exit (before the shutdown starts): collect the reference cycles that may hold
groups, destroy every group that is still up, the default group included, as
``torch.distributed.destroy_process_group()`` would, and drop the references torch keeps by
mistake. A script that destroyed its groups itself gets the last step only; one that ends on an
uncaught exception, none (a failed job's queued collectives could hold the destructor for the
group's whole timeout).
"""

from __future__ import annotations

import atexit
import gc
import sys
import types

import torch.distributed as dist

__all__ = ["destroy_groups_at_exit"]

_registered = False


def destroy_groups_at_exit() -> None:
    """Arrange, once per process, for :func:`_destroy_groups` to run at interpreter exit."""
    global _registered
    if not _registered:
        atexit.register(_destroy_groups)
        _registered = True


def _destroy_groups() -> None:
    if getattr(sys, "last_value", None) is not None:
        # An uncaught exception ends the script (Python set it there before the exit hooks):
        # end as without this hook rather than wait in a destructor for queued collectives.
        return
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _drop_captured_groups()


def _drop_captured_groups() -> None:
    """Replace the default group that ``torch.distributed.nn.functional`` froze into its
    functions' defaults (``group=group.WORLD``, evaluated when the module is imported, which
    torch does on the first optimizer built after ``init_process_group``) by None, which those
    functions read as the same default group. Left there, that reference outlives
    ``destroy_process_group`` and keeps the group's threads running into the shutdown."""
    functional = sys.modules.get("torch.distributed.nn.functional")
    if functional is None:
        return
    for f in vars(functional).values():
        if isinstance(f, types.FunctionType) and f.__defaults__:
            f.__defaults__ = tuple(
                None if isinstance(d, dist.ProcessGroup) else d for d in f.__defaults__
            )
