"""Process groups: the few facts about a group the engine needs, and groups it makes.

A group the library creates inherits the timeout of the group it is made from: without that,
``new_group`` falls back to the 30-minute default, and a user who asked for
``init_process_group(timeout=...)`` would wait half an hour on a dead peer. Groups that others
made (a device mesh's) are used as they are where they wait no longer than the default group,
and replaced by a group of the same ranks with its timeout otherwise (:func:`bounded`).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from adasum._torch import backend_timeout

__all__ = [
    "all_gather_single", "timeout_of", "new_group_like", "bounded", "message_device", "global_ranks",
    "device_type_of",
]

# torch 2.13 renamed all_gather_into_tensor to all_gather_single; torch 2.2 has only the old name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def timeout_of(group: dist.ProcessGroup | None) -> timedelta | None:
    """The timeout ``group`` was created with, or None where the backend does not tell."""
    try:
        pg = group if group is not None else dist.group.WORLD
        assert pg is not None, "torch.distributed is not initialised"
        return backend_timeout(pg)
    except RuntimeError:  # a backend without options, or a torch without them: let torch decide
        return None


def global_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group``'s members, in group-rank order."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def new_group_like(
    parent: dist.ProcessGroup | None, ranks: list[int] | None = None, *, local: bool = False
) -> dist.ProcessGroup:
    """A new group of ``ranks`` (global ranks; default: all of ``parent``'s) with ``parent``'s
    backend and timeout. Without ``local`` every rank of the world must call it, in the same
    order; with ``local`` only the members do (torch's local synchronisation)."""
    members = global_ranks(parent) if ranks is None else list(ranks)
    return dist.new_group(
        members,
        timeout=timeout_of(parent),
        backend=dist.get_backend(parent if parent is not None else dist.group.WORLD),
        use_local_synchronization=local,
    )


def bounded(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """``group``, or, where it waits longer than the default group (``init_device_mesh``
    gives its groups torch's 30-minute default whatever ``init_process_group`` was told), a new
    group of the same ranks with the default group's timeout and backend. Every member calls
    it, in the same order; the others need not."""
    mine, default = timeout_of(group), timeout_of(None)
    if mine is None or default is None or mine <= default:
        return group
    return new_group_like(None, global_ranks(group), local=True)


def message_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where small control messages (layout agreement, partial sums) travel on ``group``: the
    current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group if group is not None else dist.group.WORLD) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_type_of(group: dist.ProcessGroup | None) -> str | None:
    """The device type whose tensors ``group`` carries: "cpu" for Gloo, "cuda" for NCCL, None
    for a group with several backends."""
    backend = dist.get_backend(group if group is not None else dist.group.WORLD)
    return {"gloo": "cpu", "nccl": "cuda"}.get(backend)
