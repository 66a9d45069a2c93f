"""The reduction operations Horovod's ``op=`` takes, and the compression of tensors in flight."""

from __future__ import annotations

import enum
from typing import cast

import torch

__all__ = ["ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "resolve_op", "Compression"]


class ReduceOp(enum.IntEnum):
    """How an allreduce combines the ranks' tensors. ``Adasum`` runs :class:`adasum.Adasum`
    (any number of ranks, floating-point tensors); the others run on torch.distributed."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average, Sum, Adasum = ReduceOp.Average, ReduceOp.Sum, ReduceOp.Adasum
Min, Max, Product = ReduceOp.Min, ReduceOp.Max, ReduceOp.Product


def resolve_op(op: object, average: bool | None) -> tuple[ReduceOp | None, str | None]:
    """The operation asked for, from ``op`` or Horovod's older ``average=`` flag (neither:
    Average), or None and what is wrong, for the caller to report to every rank (raising on
    this rank alone would leave the others waiting)."""
    if op is not None and average is not None:
        return None, "pass op= or the deprecated average=, not both"
    if op is None:
        return (Sum if average is False else Average), None
    try:
        # Whatever op is, the enum's lookup either finds a member or raises ValueError.
        return ReduceOp(cast(int, op)), None
    except ValueError:
        return None, f"op={op!r} is not one of Average, Sum, Adasum, Min, Max, Product"


class _NoCompression:
    """Tensors travel as they are."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, None]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: None) -> torch.Tensor:
        return tensor


class _FP16Compression:
    """Floating-point tensors travel as float16 (half the bytes; Adasum still accumulates its
    dot products in float64, sums run in float32) and come back in their own dtype."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: torch.dtype) -> torch.Tensor:
        return tensor.to(ctx) if ctx.is_floating_point else tensor


class Compression:
    """``Compression.none`` (the default) and ``Compression.fp16``, as in Horovod. Any object
    with ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx)`` also works."""

    none = _NoCompression
    fp16 = _FP16Compression
