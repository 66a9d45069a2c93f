"""Horovod's TensorFlow ``alltoall``, ``reducescatter`` and ``grouped_reducescatter``, eager
and inside ``tf.function``, with their gradients.

Each runs the PyTorch operation of :mod:`adasum.horovod` (its agreement round first) through
:mod:`._bridge`. The gradients are Horovod's: an alltoall's rows go back the way they came (an
alltoall of the output gradient with the received splits), a reducescatter's gradient is the
allgather of the output gradients times ``prescale_factor * postscale_factor`` (and times the
number of ranks for Sum), as :class:`adasum.horovod._collectives._Reducescatter`'s is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import torch
import torch.distributed as dist

from adasum.horovod._collectives import _alltoall
from adasum.horovod._collectives import reducescatter as _torch_reducescatter
from adasum.horovod._reduce_ops import Average, Sum, resolve_op
from adasum.horovod._runtime import group_of
from adasum.horovod.tensorflow._bridge import after, on_torch
from adasum.horovod.tensorflow._ops import Compression, _gathered, _plain_python

__all__ = ["alltoall", "reducescatter", "grouped_reducescatter"]


def _rows_unknown(x: tf.Tensor) -> tf.TensorShape:
    return tf.TensorShape([None]).concatenate(x.shape[1:])


def _exchange(x: tf.Tensor, splits: tf.Tensor, name: str | None, process_set: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """The rows received and how many came from each rank (``splits`` empty: equal parts)."""
    world = dist.get_world_size(group_of(process_set))

    def run(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        tensor, sent = ts
        return list(_alltoall(tensor, sent.tolist() if sent.numel() else None, name, process_set))

    @tf.custom_gradient
    def forward(x: tf.Tensor):
        y, received = on_torch(run, [x, splits], [(x.dtype, _rows_unknown(x)), (tf.int32, tf.TensorShape([world]))])

        @after([y, received])
        def backward(dy: tf.Tensor, _: Any = None) -> tf.Tensor:
            return _exchange(tf.convert_to_tensor(dy), received, None, process_set)[0]

        return (y, received), backward

    return forward(x)


@_plain_python
def alltoall(tensor: Any, splits: Any = None, name: str | None = None, ignore_name_scope: bool = False,
             process_set: Any = None) -> Any:
    """Send rows ``splits[r]`` of ``tensor`` (dimension 0, in order; default: equal parts) to
    rank r; returns the rows received, in rank order, and with ``splits`` also how many came
    from each rank (int32)."""
    sent = tf.constant([], tf.int32) if splits is None else tf.cast(tf.convert_to_tensor(splits), tf.int32)
    out, received = _exchange(tf.convert_to_tensor(tensor), sent, name, process_set)
    return out if splits is None else (out, received)


def _scattered(tensors: list[tf.Tensor], op: Any, prescale_factor: float, postscale_factor: float,
               process_set: Any, name: str | None) -> list[tf.Tensor]:
    """This rank's block of rows of each tensor's reduction, as a differentiable operation."""
    world = dist.get_world_size(group_of(process_set))

    def run(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_torch_reducescatter(t, name=name, op=op, process_set=process_set, prescale_factor=prescale_factor,
                                     postscale_factor=postscale_factor) for t in ts]

    @tf.custom_gradient
    def forward(*xs: tf.Tensor):
        ys = on_torch(run, xs, [(x.dtype, _rows_unknown(x)) for x in xs])

        @after(ys)
        def backward(*dys: tf.Tensor) -> list[tf.Tensor]:
            resolved, _ = resolve_op(op, None)
            assert resolved is not None, "the forward pass agreed on the op"
            if resolved not in (Sum, Average):
                raise NotImplementedError(f"adasum.horovod.tensorflow: the gradient of reducescatter with "
                                          f"op={resolved.name} is not implemented; use op=Sum or op=Average")
            factor = prescale_factor * postscale_factor * (world if resolved is Sum else 1)
            gathered = _gathered([tf.convert_to_tensor(d) for d in dys], None, process_set, "grouped_allgather")
            return [g * tf.cast(factor, g.dtype) for g in gathered]

        return ys, backward

    return list(forward(*tensors)) if tensors else []


@_plain_python
def grouped_reducescatter(tensors: Sequence[Any], device_dense: str = "", compression: Any = Compression.none,
                          op: Any = Average, process_set: Any = None, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[tf.Tensor]:
    """For each tensor, this rank's block of dimension 0 of its reduction over the ranks (rank
    r gets rows [r*q + min(r, m), ...) with q, m = divmod(rows, ranks)), in one TensorFlow
    operation (one torch reducescatter per tensor inside it)."""
    compressed = [compression.compress(tf.convert_to_tensor(t)) for t in tensors]
    reduced = _scattered([c for c, _ in compressed], op, prescale_factor, postscale_factor, process_set, None)
    return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, compressed)]


@_plain_python
def reducescatter(tensor: Any, device_dense: str = "", compression: Any = Compression.none, op: Any = Average,
                  name: str | None = None, process_set: Any = None, ignore_name_scope: bool = False,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> tf.Tensor:
    """This rank's block of dimension 0 of the reduction of every rank's ``tensor`` (any
    ``op``, Adasum included: an allreduce and a slice), as :func:`grouped_reducescatter`."""
    compressed, ctx = compression.compress(tf.convert_to_tensor(tensor))
    (reduced,) = _scattered([compressed], op, prescale_factor, postscale_factor, process_set, name)
    return compression.decompress(reduced, ctx)
