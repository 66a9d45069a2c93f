"""The one validation every entry point runs before any data moves.

Each rank first looks at its own input alone (:func:`local_problem`: not a tensor, a dtype
Adasum does not support, tensors on several devices, a device the process group does not
carry). Then the ranks agree (:func:`agree`): one small message per partner carries a flag for a
local problem, a hash of the layout (shapes and dtypes in order) and a hash of the settings
(reducer, its options, whether statistics are asked for). Only when something differs does a
second round exchange the descriptions, and then every rank raises the same error, naming the
first rank with a problem or the first difference from rank 0. No rank goes on to move data
while another has given up, so a bad input never hangs a peer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from adasum._layout import Layout
from adasum._ops import SUPPORTED_DTYPES, unsupported_dtype
from adasum._p2p import Link, everyone_max
from adasum._plan import plan_of

__all__ = ["Problem", "local_problem", "flat_problem", "agree", "raise_first", "describe_mismatch"]

#: ``(name, value)`` pairs every rank must pass alike (reducer, options, stats).
Setting = tuple[tuple[str, object], ...]


class Problem(NamedTuple):
    """Something one rank can see wrong with its own input."""

    kind: type[Exception]
    message: str


def local_problem(tensors: Sequence[Any], device_type: str | None) -> Problem | None:
    """The first thing wrong with ``tensors`` that this rank sees alone, or None.

    ``device_type`` is the device the process group carries ("cpu" for Gloo, "cuda" for NCCL),
    or None when it carries either.
    """
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            return Problem(TypeError, f"item {i} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            return Problem(TypeError, unsupported_dtype(f"tensor {i}", t.dtype))
        if t.layout != torch.strided:
            return Problem(TypeError, f"tensor {i} is {t.layout}; Adasum needs dense tensors")
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        return Problem(ValueError, f"the tensors are on several devices: {', '.join(devices)}")
    if devices and device_type is not None and tensors[0].device.type != device_type:
        return Problem(
            ValueError, f"the tensors are on {devices[0]}, but the process group carries {device_type} tensors"
        )
    return None


def flat_problem(buffer: Any, numels: Sequence[int], device_type: str | None) -> Problem | None:
    """:func:`local_problem` for one flat buffer of layers of ``numels`` elements."""
    problem = local_problem([buffer], device_type)
    if problem is not None:
        return problem
    if buffer.dim() != 1 or not buffer.is_contiguous():
        return Problem(ValueError, "the flat buffer must be a contiguous 1-D tensor")
    if any(int(n) < 0 for n in numels) or sum(int(n) for n in numels) != buffer.numel():
        return Problem(ValueError, f"the layers' sizes add up to {sum(numels)}, the buffer holds {buffer.numel()}")
    return None


@lru_cache(maxsize=64)
def _hash(setting: Setting) -> int:
    # Stable across processes (unlike hash()), and a signed 63-bit integer for an int64 message.
    digest = hashlib.blake2b(repr(setting).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def agree(
    group: dist.ProcessGroup | None,
    problem: Problem | None,
    layout: Layout | None,
    setting: Setting,
    device: torch.device,
) -> None:
    """Return on every rank of ``group`` when no rank has a problem and all passed the same
    layout and setting; otherwise raise the same error on every rank."""
    world = dist.get_world_size(group)
    if world == 1:
        raise_first([(problem, None, setting)])
        return
    header = [int(problem is not None), 0 if layout is None else layout.signature, _hash(setting)]
    # The maximum of each value and of its negative: max == -max(-x) means all ranks agree.
    message = torch.tensor(header + [-h for h in header], dtype=torch.int64, device=device)
    agreed = everyone_max(message, plan_of(world, dist.get_rank(group)), Link(group)).tolist()
    if agreed[0] == 0 and agreed[1] == -agreed[4] and agreed[2] == -agreed[5]:
        return
    layers = None if layout is None else [layout.describe(i) for i in range(len(layout))]
    described: list = [None] * world
    dist.all_gather_object(described, (problem, layers, setting), group=group)
    raise_first(described)
    raise ValueError("adasum: the ranks passed different inputs")  # a hash collision's guard


def raise_first(described: Sequence[tuple[Problem | None, list[str] | None, Setting]]) -> None:
    """Raise the error of the first rank with a problem, else the first difference from rank
    0; return when there is neither."""
    for r, (problem, _, _) in enumerate(described):
        if problem is not None:
            raise problem.kind(f"adasum: rank {r}: {problem.message}")
    mismatch = describe_mismatch(described)
    if mismatch is not None:
        raise ValueError(f"adasum: {mismatch}")


def describe_mismatch(described: Sequence[tuple[object, list[str] | None, Setting]]) -> str | None:
    """The first difference between rank 0's layers and setting and another rank's."""
    _, layers0, setting0 = described[0]
    for r, (_, layers, setting) in enumerate(described[1:], start=1):
        layers, layers0 = layers or [], layers0 or []
        if len(layers) != len(layers0):
            return f"rank {r} passed {len(layers)} tensors, rank 0 passed {len(layers0)}"
        for i, (x, y) in enumerate(zip(layers, layers0)):
            if x != y:
                return f"tensor {i} is {x} on rank {r} but {y} on rank 0"
        for (key, value), (_, value0) in zip(setting, setting0):
            if value != value0:
                return f"{key}={value} on rank {r} but {key}={value0} on rank 0"
    return None
