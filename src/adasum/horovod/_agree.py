"""Every operation's first step: the ranks agree on what they pass, or all raise.

Horovod's coordinator matched operations by name and told every rank when their tensors
differed. torch.distributed matches operations by the order they are issued and would pair
mismatched tensors silently, fail on one rank only, or wait forever. So before any data moves,
one small all-reduce carries, per rank, a flag for a problem it sees alone and a hash of what
it passes (the operation, its settings, each tensor's shape, dtype and device type); only when
something differs do the ranks exchange their descriptions, and then every rank raises the same
:class:`MismatchError` naming the first rank with a problem or the first difference from rank 0.
The all-reduce runs under the process group's timeout, like every collective here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum._groups import message_device

__all__ = ["MismatchError", "agree", "describe"]


class MismatchError(ValueError, RuntimeError):
    """The ranks passed different or invalid inputs to one operation; raised on every rank.
    A ValueError, and a RuntimeError as Horovod's own mismatch errors were. ``rank_problem``
    is True when a rank's input was invalid by itself (not merely different from another's)."""

    def __init__(self, message: str, rank_problem: bool = False) -> None:
        super().__init__(message)
        self.rank_problem = rank_problem


def describe(tensor: object, *, any_first_dim: bool = False) -> str:
    """``(4, 5) float32 cpu``; with ``any_first_dim`` the first dimension may differ between
    ranks (allgather): ``(*, 5) float32 cpu``."""
    if not isinstance(tensor, torch.Tensor):
        return type(tensor).__name__
    shape = ["*" if any_first_dim and i == 0 else str(d) for i, d in enumerate(tensor.shape)]
    dims = f"({', '.join(shape)}{',' if len(shape) == 1 else ''})"
    return f"{dims} {str(tensor.dtype).removeprefix('torch.')} {tensor.device.type}"


def _hash(value: object) -> int:
    # Stable across processes (unlike hash()), and within int64.
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 1


def agree(
    group: dist.ProcessGroup | None,
    operation: str,
    tensors: Sequence[str],
    setting: tuple[tuple[str, object], ...],
    problem: str | None,
) -> None:
    """Return on every rank of ``group`` when no rank has a ``problem`` and all passed the same
    tensor descriptions (:func:`describe`) and ``setting``; otherwise raise the same
    :class:`MismatchError` on every rank.

    ``operation`` names the call in messages; its kind (``allreduce_`` and
    ``grouped_allreduce`` are both allreduces) is part of what the ranks agree on, so ranks
    that issue different operations at the same point raise instead of pairing them. Since
    no rank returns before every rank has contributed, a successful agreement is a barrier.
    """
    setting = (("operation", _kind(operation)),) + tuple(setting)
    if dist.get_world_size(group) == 1:
        if problem is not None:
            raise MismatchError(f"hvd.{operation}: {problem}", rank_problem=True)
        return
    signature = _hash((tuple(tensors), setting))
    message = torch.tensor([int(problem is not None), signature, -signature], device=message_device(group))
    dist.all_reduce(message, op=dist.ReduceOp.MAX, group=group)
    flag, high, low = message.tolist()
    if flag == 0 and high == -low:
        return
    described: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(described, (problem, tuple(tensors), setting), group=group)
    raise MismatchError(f"hvd.{operation}: {_first_difference(described)}",
                        rank_problem=any(p is not None for p, _, _ in described))


def _kind(operation: str) -> str:
    """``grouped_allreduce_`` -> ``allreduce``: the forms of one operation pair with each other."""
    return operation.removeprefix("grouped_").rstrip("_")


def _first_difference(described: list[tuple[str | None, tuple[str, ...], tuple]]) -> str:
    for r, (problem, _, _) in enumerate(described):
        if problem is not None:
            return f"rank {r}: {problem}"
    _, tensors0, setting0 = described[0]
    for r, (_, tensors, setting) in enumerate(described[1:], start=1):
        # The settings first: they name the operation, and a different operation explains
        # different tensors.
        for (key, value), (key0, value0) in zip(setting, setting0):
            if (key, value) != (key0, value0):
                return f"{key}={value!r} on rank {r} but {key0}={value0!r} on rank 0"
        if len(tensors) != len(tensors0):
            return f"rank {r} passed {len(tensors)} tensors, rank 0 passed {len(tensors0)}"
        for i, (mine, theirs) in enumerate(zip(tensors, tensors0)):
            if mine != theirs:
                return f"tensor {i} is {mine} on rank {r} but {theirs} on rank 0"
    return "the ranks passed different inputs"  # a hash collision's guard
