"""Run one of adasum.horovod's torch operations on TensorFlow tensors, eagerly or in a graph.

The TensorFlow front door adds no collective of its own: every operation is the PyTorch one
(its agreement round, its engine), reached through DLPack. Eagerly the inputs are viewed as
torch tensors without a copy and the outputs come back the same way. Inside ``tf.function``
the same Python becomes one ``tf.py_function`` node; TensorFlow runs stateful nodes such as
this one in program order, which is what keeps every rank issuing the same operations in the
same order (torch.distributed pairs operations by order, not by name).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import tensorflow as tf
import torch

from adasum.horovod import _agree
from adasum.tensorflow._collective import _aligned

__all__ = ["on_torch", "after", "MismatchError", "InvalidInputError"]

F = TypeVar("F", bound=Callable[..., Any])

# One operation at a time per process: a TensorFlow 1 session runs independent graph nodes on
# several threads, and two collectives must never share the process group at once.
_one_at_a_time = threading.RLock()


class MismatchError(_agree.MismatchError, tf.errors.FailedPreconditionError):
    """The ranks passed different things (shapes, dtypes, ops, root ranks): adasum.horovod's
    :class:`~adasum.horovod.MismatchError` that is also ``tf.errors.FailedPreconditionError``,
    the error Horovod's TensorFlow operations raised. Eagerly it arrives as it is; inside a
    graph TensorFlow re-raises it as its ``InvalidArgumentError`` with the same message (a
    ``tf.py_function`` keeps no error class of its own)."""

    def __init__(self, message: str) -> None:
        tf.errors.FailedPreconditionError.__init__(self, None, None, message)
        self.rank_problem = False


class InvalidInputError(_agree.MismatchError, tf.errors.InvalidArgumentError):
    """A rank passed an input that is invalid by itself (an unknown op, a root rank out of
    range, splits that do not add up): adasum.horovod's MismatchError that is also
    ``tf.errors.InvalidArgumentError``, the error Horovod's TensorFlow operations raised for it."""

    def __init__(self, message: str) -> None:
        tf.errors.InvalidArgumentError.__init__(self, None, None, message)
        self.rank_problem = True

#: What an output looks like: its dtype and its (possibly partly unknown) static shape.
Spec = tuple[tf.DType, tf.TensorShape]


def _to_tf(t: torch.Tensor) -> tf.Tensor:
    # TensorFlow aborts on tensors that are not 64-byte aligned; fresh torch tensors are.
    return tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(_aligned(t.contiguous())))


@tf.autograph.experimental.do_not_convert
def on_torch(
    fn: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], tensors: Sequence[tf.Tensor], specs: Sequence[Spec]
) -> list[tf.Tensor]:
    """``fn`` (torch tensors it must not write -> new torch tensors) applied to ``tensors``;
    ``specs`` describe the outputs for the graph. Errors raised by ``fn`` arrive as they are
    when eager, and inside a graph as TensorFlow's own error carrying the same message."""

    def call(*args: tf.Tensor) -> list[tf.Tensor]:
        try:
            with _one_at_a_time:
                outputs = fn([torch.from_dlpack(a) for a in args])
        except _agree.MismatchError as e:
            raise (InvalidInputError if e.rank_problem else MismatchError)(str(e)) from e
        return [_to_tf(t) for t in outputs]

    if tf.executing_eagerly():
        return call(*tensors)
    out = tf.py_function(call, list(tensors), [dtype for dtype, _ in specs])
    for o, (_, shape) in zip(out, specs):
        o.set_shape(shape)
    return list(out)


def after(outputs: Sequence[tf.Tensor]) -> Callable[[F], F]:
    """Make a gradient function build its operations to run after the forward ``outputs`` and
    after what it built before for the same forward operation. A backward collective often
    needs only the output gradients; without this a TensorFlow 1 session could start it before
    the forward one on some ranks and after it on others. And every ``tf.gradients`` call builds
    the gradient again (one per output of a grouped operation, in Horovod's tests): fetched in
    one ``session.run``, those backward collectives are independent nodes that the ranks would
    run in different orders, pairing one rank's gradient of output 1 with another's of output 3
    (same shapes, so no mismatch is raised: wrong sums). Chaining them in the order they were
    built, which is the same on every rank, pairs them right. A ``tf.function`` orders them
    anyway, and eagerly this does nothing."""

    def wrap(backward: F) -> F:
        built: list[tf.Tensor] = []  # what earlier calls returned, across graphs

        @functools.wraps(backward)
        def ordered(*grads: Any) -> Any:  # no **kwargs: tf.custom_gradient reads the signature
            graph = tf.compat.v1.get_default_graph()
            before = [o for o in outputs if o is not None] + [b for b in built if b.graph is graph]
            with tf.control_dependencies(before):
                result = backward(*grads)
            if not tf.executing_eagerly():
                built.extend(t for t in tf.nest.flatten(result) if isinstance(t, tf.Tensor))
            return result

        return ordered  # type: ignore[return-value]

    return wrap
