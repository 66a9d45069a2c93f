"""Horovod's TensorFlow collectives: allreduce, allgather and broadcast, eager and inside
``tf.function``, with their gradients.

Each runs the PyTorch operation of :mod:`adasum.horovod` on the tensors (through
:mod:`._bridge`), so the ranks first agree on what they pass and a mismatch raises
:class:`adasum.horovod.MismatchError` on every rank; inside a graph TensorFlow re-raises it as
one of its own errors with the same message. The gradients are Horovod's: a Sum or Average
allreduce passes the same reduction of the output gradients back (Min and Max to the ranks whose
input was the result), an allgather this rank's rows of the averaged output gradient, a
broadcast the averaged gradient on the root and zero elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import torch
import torch.distributed as dist

from adasum.horovod import _allreduce as _torch_allreduce
from adasum.horovod._collectives import _start_allgather, broadcast_many_async_
from adasum.horovod._reduce_ops import Adasum, Average, Max, Min, Sum, resolve_op
from adasum.horovod._runtime import group_of
from adasum.horovod.tensorflow._bridge import after, on_torch

# The operations below are Python that builds TensorFlow operations; AutoGraph must leave them be.
_plain_python = tf.autograph.experimental.do_not_convert

__all__ = ["Compression", "allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast",
           "broadcast_", "broadcast_variables", "broadcast_global_variables"]


class _NoCompression:
    """Tensors travel as they are."""

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, None]:
        return tensor, None

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: None) -> tf.Tensor:
        return tensor


class _FP16Compression:
    """Floating-point tensors travel as float16 and come back in their own dtype (Adasum still
    accumulates its dot products in float64)."""

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, tf.DType]:
        return (tf.cast(tensor, tf.float16) if tensor.dtype.is_floating else tensor), tensor.dtype

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: tf.DType) -> tf.Tensor:
        return tf.cast(tensor, ctx) if ctx.is_floating else tensor


class Compression:
    """``Compression.none`` (the default) and ``Compression.fp16``, as in Horovod; any object
    with ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx)`` works too."""

    none = _NoCompression
    fp16 = _FP16Compression


# -- allreduce -----------------------------------------------------------------------------

def _reduced(tensors: list[tf.Tensor], op: Any, average: bool | None, prescale_factor: float,
             postscale_factor: float, name: str | None, process_set: Any, operation: str) -> list[tf.Tensor]:
    """The grouped allreduce of dense tensors, as a differentiable TensorFlow operation
    (``operation`` names it in error messages)."""
    call = _torch_allreduce._Call(operation, op, average, prescale_factor, postscale_factor, process_set, name)

    def run(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return _torch_allreduce._start(ts, [torch.empty_like(t) for t in ts], call).wait()

    @tf.custom_gradient
    def forward(*xs: tf.Tensor):
        ys = on_torch(run, xs, [(x.dtype, x.shape) for x in xs])

        @after(ys)
        def backward(*dys: tf.Tensor) -> list[tf.Tensor]:
            resolved, _ = resolve_op(op, average)  # valid: the forward pass agreed on it
            assert resolved is not None, "the forward pass agreed on the op"
            if resolved not in (Sum, Average, Min, Max):
                raise NotImplementedError(
                    f"adasum.horovod.tensorflow: the gradient of allreduce with op={resolved.name} is not "
                    "implemented; use op=Sum or op=Average inside a differentiated computation")
            dense = [tf.convert_to_tensor(d) for d in dys]
            if resolved in (Sum, Average):
                return _reduced(dense, resolved, None, prescale_factor, postscale_factor, None, process_set, operation)
            # Min, Max: the summed gradient goes to every rank whose input was the result.
            summed = _reduced(dense, Sum, None, prescale_factor, postscale_factor, None, process_set, operation)
            return [s * tf.cast(tf.equal(x * prescale_factor, y / postscale_factor), s.dtype)
                    for s, x, y in zip(summed, xs, ys)]

        return ys, backward

    return list(forward(*tensors)) if tensors else []


def _sparse(slices: tf.IndexedSlices, op: Any, average: bool | None, prescale_factor: float,
            postscale_factor: float, process_set: Any) -> tf.IndexedSlices:
    """A sparse gradient's Sum or Average: every rank's rows and indices gathered."""
    resolved, problem = resolve_op(op, average)
    if resolved is Adasum:
        raise NotImplementedError("adasum.horovod.tensorflow: Adasum needs dense tensors; pass "
                                  "sparse_as_dense=True (or tf.convert_to_tensor the IndexedSlices)")
    if problem or resolved not in (Sum, Average):
        raise NotImplementedError("adasum.horovod.tensorflow: tf.IndexedSlices reduce with op=Sum or op=Average only")
    if prescale_factor != 1.0 or postscale_factor != 1.0:
        raise NotImplementedError("adasum.horovod.tensorflow: prescale_factor and postscale_factor need dense tensors")
    values, indices = grouped_allgather([slices.values, slices.indices], process_set=process_set)
    if resolved is Average:
        values = values / tf.cast(dist.get_world_size(group_of(process_set)), values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=slices.dense_shape)


def _allreduce_many(tensors: list[Any], average: bool | None, compression: Any, op: Any, prescale_factor: float,
                    postscale_factor: float, process_set: Any, name: str | None, operation: str) -> list[Any]:
    """Dense tensors reduced in one operation (compressed in flight), ``tf.IndexedSlices`` by
    gathering, one operation each. In a TensorFlow 1 graph each is chained after the one
    before: as independent nodes a session would run them in an order of its own on each rank,
    pairing one rank's slices with another's of a different tensor."""
    dense = [i for i, t in enumerate(tensors) if not isinstance(t, tf.IndexedSlices)]
    out: list[Any] = [None] * len(tensors)
    previous: list[tf.Tensor] = []
    for i, t in enumerate(tensors):
        if i not in dense:
            with tf.control_dependencies(previous):
                out[i] = _sparse(t, op, average, prescale_factor, postscale_factor, process_set)
            previous = [out[i].values]
    compressed = [compression.compress(tf.convert_to_tensor(tensors[i])) for i in dense]
    with tf.control_dependencies(previous):
        reduced = _reduced([c for c, _ in compressed], op, average, prescale_factor, postscale_factor, name,
                           process_set, operation)
    for i, r, (_, ctx) in zip(dense, reduced, compressed):
        out[i] = compression.decompress(r, ctx)
    return out


@_plain_python
def grouped_allreduce(tensors: Sequence[Any], average: bool | None = None, device_dense: str = "",
                      device_sparse: str = "", compression: Any = Compression.none, op: Any = None,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: Any = None,
                      ignore_name_scope: bool = False, name: str | None = None) -> list[Any]:
    """The reduction over all ranks of each of ``tensors`` (position i with position i), in one
    operation: the average by default, ``op=Adasum`` for Adasum (any number of ranks, the same
    bits on every rank). ``tf.IndexedSlices`` are reduced by gathering (Sum and Average only).
    ``device_dense``, ``device_sparse`` and ``ignore_name_scope`` are accepted and not needed:
    tensors are reduced where they lie and names do not depend on name scopes."""
    return _allreduce_many(list(tensors), average, compression, op, prescale_factor, postscale_factor, process_set,
                           name, "grouped_allreduce")


@_plain_python
def allreduce(tensor: Any, average: bool | None = None, device_dense: str = "", device_sparse: str = "",
              compression: Any = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, name: str | None = None, process_set: Any = None,
              ignore_name_scope: bool = False) -> Any:
    """The reduction of ``tensor`` (a ``tf.Tensor``, ``tf.Variable`` or ``tf.IndexedSlices``)
    over all ranks, as :func:`grouped_allreduce` reduces each of its tensors."""
    return _allreduce_many([tensor], average, compression, op, prescale_factor, postscale_factor, process_set, name,
                           "allreduce")[0]


# -- allgather -----------------------------------------------------------------------------

def _gathered(tensors: list[tf.Tensor], name: str | None, process_set: Any, operation: str) -> list[tf.Tensor]:
    world = dist.get_world_size(group_of(process_set))

    def run(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        handle, counts = _start_allgather(ts, process_set, operation, name)
        # The row counts come out too, so that the backward pass needs no second exchange.
        return list(handle.wait()) + [torch.tensor(n, dtype=torch.int64) for n in counts]

    @tf.custom_gradient
    def forward(*xs: tf.Tensor):
        specs = [(x.dtype, tf.TensorShape([None]).concatenate(x.shape[1:])) for x in xs]
        out = on_torch(run, xs, specs + [(tf.int64, tf.TensorShape([world]))] * len(xs))
        ys, counts = out[: len(xs)], out[len(xs):]

        @after(out)
        def backward(*dys: tf.Tensor) -> list[tf.Tensor]:
            averaged = _reduced([tf.convert_to_tensor(d) for d in dys], Average, None, 1.0, 1.0, None, process_set,
                                "grouped_allreduce")
            me = dist.get_rank(group_of(process_set))
            return [a[tf.reduce_sum(n[:me]): tf.reduce_sum(n[: me + 1])] for a, n in zip(averaged, counts)]

        return ys, backward

    return list(forward(*tensors)) if tensors else []


@_plain_python
def grouped_allgather(tensors: Sequence[Any], name: str | None = None, ignore_name_scope: bool = False,
                      process_set: Any = None) -> list[tf.Tensor]:
    """For each position, every rank's tensor concatenated along dimension 0 in rank order
    (the first dimension may differ between ranks, the others not)."""
    return _gathered([tf.convert_to_tensor(t) for t in tensors], name, process_set, "grouped_allgather")


@_plain_python
def allgather(tensor: Any, name: str | None = None, ignore_name_scope: bool = False, process_set: Any = None) -> tf.Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0 in rank order."""
    return _gathered([tf.convert_to_tensor(tensor)], name, process_set, "allgather")[0]


# -- broadcast -----------------------------------------------------------------------------

def _broadcast_values(values: list[tf.Tensor], root_rank: int, process_set: Any, operation: str,
                      name: str | None) -> list[tf.Tensor]:
    """Rank ``root_rank``'s ``values`` on every rank (not differentiated)."""

    def run(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return broadcast_many_async_([t.clone() for t in ts], root_rank, process_set, operation, name).wait()

    return on_torch(run, values, [(v.dtype, v.shape) for v in values]) if values else []


@_plain_python
def broadcast(tensor: Any, root_rank: int, name: str | None = None, ignore_name_scope: bool = False,
              process_set: Any = None) -> tf.Tensor:
    """``tensor``'s value on ``root_rank`` (a rank of ``process_set``), on every rank."""

    @tf.custom_gradient
    def forward(x: tf.Tensor):
        (y,) = _broadcast_values([x], root_rank, process_set, "broadcast", name)

        @after([y])
        def backward(dy: tf.Tensor) -> tf.Tensor:
            (averaged,) = _reduced([tf.convert_to_tensor(dy)], Average, None, 1.0, 1.0, None, process_set, "allreduce")
            root = dist.get_rank(group_of(process_set)) == root_rank
            return averaged if root else tf.zeros_like(averaged)

        return y, backward

    return forward(tf.convert_to_tensor(tensor))


def _assigned(variables: Sequence[Any], root_rank: int, process_set: Any, operation: str,
              name: str | None) -> list[Any]:
    """Every variable assigned its value on ``root_rank``, in one operation (one agreement on
    all shapes and dtypes first); the assignments."""
    variables = list(variables)
    values = _broadcast_values([tf.convert_to_tensor(v) for v in variables], root_rank, process_set, operation, name)
    return [v.assign(value) for v, value in zip(variables, values)]


@_plain_python
def broadcast_(variables: Sequence[Any], root_rank: int, name: str | None = None, process_set: Any = None) -> list:
    """Assign every variable its value on ``root_rank``, in place, in one operation; returns
    the variables' new values."""
    return _assigned(variables, root_rank, process_set, "broadcast_", name)


@_plain_python
def broadcast_variables(variables: Sequence[Any], root_rank: int, process_set: Any = None,
                        inplace: bool = False) -> Any:
    """Assign every variable its value on ``root_rank``, in one operation. Returns the grouped
    assignments inside a graph, None eagerly. ``inplace`` is accepted: the values always travel
    through one fresh buffer each."""
    assigns = _assigned(variables, root_rank, process_set, "broadcast_variables", None)
    return None if tf.executing_eagerly() else tf.group(*assigns)


def broadcast_global_variables(root_rank: int) -> Any:
    """TensorFlow 1's global variables, assigned their values on ``root_rank`` (graph mode
    only, as in Horovod; eagerly there are no global variables: a RuntimeError)."""
    if tf.executing_eagerly():
        raise RuntimeError("hvd.broadcast_global_variables() does not work eagerly (TensorFlow 2 keeps no global "
                           "variables); use hvd.broadcast_variables(model.variables, root_rank)")
    return broadcast_variables(tf.compat.v1.global_variables(), root_rank)
