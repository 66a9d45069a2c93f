"""Adasum of TensorFlow tensors across worker processes, on the PyTorch engine.

A list of TensorFlow tensors crosses into PyTorch without a copy (DLPack), is copied once into a
fresh flat buffer per dtype, is reduced there in place by an :class:`adasum.Reducer` over a
torch.distributed group (Gloo on CPU, NCCL on CUDA), and comes back as TensorFlow tensors that
are views of that buffer (DLPack again, no copy). The buffer is fresh on every call because the
returned tensors keep it: TensorFlow tensors are immutable, so nothing may write to it later.

Inside ``tf.function`` the same Python runs as a ``tf.py_function`` node, so graphs and Keras's
compiled train step work (XLA-compiled functions cannot call Python and are refused by
TensorFlow with its own error). Eagerly it is a plain call, so validation errors arrive as the
same TypeError or ValueError on every worker; inside a graph TensorFlow re-raises them as one
of its own errors (a ``tf.errors.OpError``) carrying the same message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import torch
import torch.distributed as dist

from adasum._adasum import Adasum
from adasum._broadcast import broadcast as agreed_broadcast
from adasum._reducer import Reducer

__all__ = ["all_reduce", "broadcast", "check"]


# The functions below are Python that builds one py_function node; AutoGraph must leave them be.
@tf.autograph.experimental.do_not_convert
def all_reduce(tensors: Any, reducer: Reducer | None = None, *, options: Mapping[str, object] | None = None) -> Any:
    """The Adasum (or ``reducer``'s reduction) of every worker's ``tensors``, per tensor.

    ``tensors`` is one ``tf.Tensor`` (or ``tf.Variable``) or a list or tuple of them; returns new
    tensors in the same structure. Every worker calls this with the same shapes and dtypes in the
    same order; afterwards every worker holds the same bits, equal to
    :func:`adasum.reduce` of all workers' tensors up to the float64 rounding of the dot products
    (rule 5 of the contract). The default reducer is :class:`adasum.Adasum` over the default
    torch.distributed group, which the program initialises (``torch.distributed
    .init_process_group("gloo")``, e.g. under ``torchrun``). ``options``: the caller's own
    settings every worker must pass alike (:meth:`adasum.Reducer.check`).
    """
    reducer = reducer if reducer is not None else _default()
    return _apply(lambda flat: _reduced(flat, reducer, options), tensors)


@tf.autograph.experimental.do_not_convert
def broadcast(tensors: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``tensors`` (of ``group``) on every worker, in the structure given: the
    helper that makes workers start equal. The workers first agree on the shapes, dtypes and
    ``src``; on a difference every worker raises the same ValueError and no data moves."""

    def sent(flat: list[torch.Tensor]) -> list[torch.Tensor]:
        agreed_broadcast(flat, src, group)
        return flat

    return _apply(sent, tensors)


@tf.autograph.experimental.do_not_convert
def check(tensors: Any, reducer: Reducer | None = None, *, options: Mapping[str, object] | None = None) -> tf.Tensor:
    """The validation of :func:`all_reduce` alone (:meth:`adasum.Reducer.check`): returns on
    every worker or raises the same error on every worker, and moves no data.

    Returns a scalar ``True`` that exists only once every worker has passed. Inside a graph,
    make whatever must not happen on a refusal depend on it
    (``with tf.control_dependencies([check(ts)]): ...``): a graph runs its operations in the
    order of their dependencies, not of the code, so a check that nothing depends on may run
    after, or beside, the updates written below it.
    """
    reducer = reducer if reducer is not None else _default()
    values = [tf.convert_to_tensor(t) for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors])]

    def call(*args: tf.Tensor) -> tf.Tensor:
        reducer.check([torch.from_dlpack(a) for a in args], options=options)  # reads only: no copy needed
        return tf.constant(True)

    if tf.executing_eagerly():
        return call(*values)
    passed = tf.py_function(call, values, tf.bool)
    passed.set_shape([])
    return passed


_DEFAULT: list[Reducer] = []


def _default() -> Reducer:
    # One Adasum for the process, so its buffers are reused from call to call.
    if not _DEFAULT:
        _DEFAULT.append(Adasum())
    return _DEFAULT[0]


def _apply(fn, tensors: Any) -> Any:
    """Run ``fn`` (torch tensors in place -> the same list) on TensorFlow tensors: directly when
    eager, as one ``tf.py_function`` node inside a graph."""
    single = not isinstance(tensors, (list, tuple))
    values = [tf.convert_to_tensor(t) for t in ([tensors] if single else tensors)]

    def call(*args: tf.Tensor) -> list[tf.Tensor]:
        flat = fn(_copied_to_torch(args))
        return [tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(_aligned(t))) for t in flat]

    # No shortcut for an empty list: the workers still agree, so that one that passes nothing
    # while the others pass tensors raises with them instead of leaving them waiting.
    if tf.executing_eagerly():
        out = call(*values)
    else:
        out = tf.py_function(call, values, [v.dtype for v in values])
        for o, v in zip(out, values):
            o.set_shape(v.shape)
    if single:
        return out[0]
    return type(tensors)(out) if isinstance(tensors, tuple) else list(out)


def _copied_to_torch(values: Sequence[tf.Tensor]) -> list[torch.Tensor]:
    """The values as torch tensors that are views, end to end, of one fresh buffer per dtype
    (so the reducer works on them in place, without packing them again)."""
    views = [torch.from_dlpack(v) for v in values]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, v in enumerate(views):
        by_dtype.setdefault(v.dtype, []).append(i)
    out: list[torch.Tensor] = [None] * len(views)  # type: ignore[list-item]
    for dtype, idx in by_dtype.items():
        buffer = torch.empty(sum(views[i].numel() for i in idx), dtype=dtype, device=views[idx[0]].device)
        at = 0
        for i in idx:
            n = views[i].numel()
            out[i] = buffer[at : at + n].view(views[i].shape)
            out[i].copy_(views[i])
            at += n
    return out


#: TensorFlow's kernels require tensors aligned to this many bytes (Eigen's maximum alignment)
#: and abort the process on one that is not.
ALIGNMENT = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where it does not start on an :data:`ALIGNMENT` boundary (a view
    into the middle of a flat buffer; PyTorch's allocations are aligned)."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def _reduced(flat: list[torch.Tensor], reducer: Reducer, options: Mapping[str, object] | None) -> list[torch.Tensor]:
    reducer.all_reduce(flat, options=options)
    return flat
