"""``DistributedGradientTape``: a ``tf.GradientTape`` whose ``gradient`` returns the gradients
reduced over the ranks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import tensorflow as tf
import torch.distributed as dist

from adasum.horovod._reduce_ops import Average
from adasum.horovod._runtime import group_of
from adasum.horovod.tensorflow._ops import Compression, grouped_allreduce

__all__ = ["DistributedGradientTape", "PartialDistributedGradientTape", "gradient_settings"]


def gradient_settings(op: Any, gradient_predivide_factor: float) -> tuple[float, float]:
    """The (prescale, postscale) factors that split an average as ``gradient_predivide_factor``
    asks (the average's own division by the number of ranks comes after them)."""
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor needs op=Average")
    return 1.0 / gradient_predivide_factor, gradient_predivide_factor


def _divided(gradient: Any, ranks: float) -> Any:
    """A dense or sparse (``tf.IndexedSlices``, an embedding's) gradient divided by ``ranks``."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values / ranks, gradient.indices, gradient.dense_shape)
    return gradient / ranks


class DistributedGradientTape:
    """Wrap a ``tf.GradientTape`` so that :meth:`gradient` reduces the gradients over the ranks
    (default: their average; ``op=hvd.Adasum`` for Adasum), in one grouped allreduce.

    Made after the recording, as in Horovod::

        with tf.GradientTape() as tape:
            loss = loss_fn(model(x), y)
        tape = hvd.DistributedGradientTape(tape, op=hvd.Adasum)
        grads = tape.gradient(loss, model.trainable_variables)

    or around a tape not yet entered (``with hvd.DistributedGradientTape(tf.GradientTape()) as
    tape:``). Everything else (``watch``, ``stop_recording``, ``jacobian``, ...) is the wrapped
    tape's. Missing gradients (None) stay None and are not sent, so every rank must miss the
    same ones. ``groups``, ``num_groups``, ``device_dense`` and ``device_sparse`` are accepted
    and not needed: all gradients travel in one operation.
    """

    def __init__(self, gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                 compression: Any = Compression.none, sparse_as_dense: bool = False, op: Any = Average,
                 gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups: Any = None,
                 process_set: Any = None, scale_local_gradients: bool = True) -> None:
        if not isinstance(gradtape, tf.GradientTape):
            raise TypeError(f"expected a tf.GradientTape, got {type(gradtape).__name__}")
        self._tape = gradtape
        self._prescale, self._postscale = gradient_settings(op, gradient_predivide_factor)
        self._op, self._compression, self._sparse_as_dense = op, compression, sparse_as_dense
        self._process_set, self._scale_local = process_set, scale_local_gradients
        self._local: dict[int, Any] = {}  # id -> source (kept, so that the id stays its own)

    def __enter__(self) -> DistributedGradientTape:
        self._tape.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tape.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: the wrapped tape's API.
        return getattr(self._tape, name)

    def register_local_source(self, source: tf.Variable) -> None:
        """Keep ``source``'s gradient on this rank (divided by the number of ranks unless
        ``scale_local_gradients=False``, as Horovod did)."""
        self._local[id(source)] = source

    @tf.autograph.experimental.do_not_convert  # Python that builds the reduction
    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE, **ignored: Any) -> Any:
        """The wrapped tape's gradients, reduced over the ranks, in the structure of ``sources``."""
        grads = self._tape.gradient(target, sources, output_gradients, unconnected_gradients=unconnected_gradients)
        flat_sources, flat = tf.nest.flatten(sources), tf.nest.flatten(grads)
        shared = [i for i, (s, g) in enumerate(zip(flat_sources, flat)) if g is not None and id(s) not in self._local]
        sent = [tf.convert_to_tensor(flat[i]) if self._sparse_as_dense else flat[i] for i in shared]
        reduced = grouped_allreduce(sent, compression=self._compression, op=self._op, prescale_factor=self._prescale,
                                    postscale_factor=self._postscale, process_set=self._process_set)
        for i, r in zip(shared, reduced):
            flat[i] = r
        if self._scale_local and self._local:
            ranks = float(dist.get_world_size(group_of(self._process_set)))
            for i, s in enumerate(flat_sources):
                if flat[i] is not None and id(s) in self._local:
                    flat[i] = _divided(flat[i], ranks)
        return tf.nest.pack_sequence_as(grads, flat)

    def get_local_and_global_gradients(self, target: Any, sources: Iterable, output_gradients: Any = None,
                                       **ignored: Any) -> tuple[list, list]:
        """``(source, gradient)`` pairs for the local sources and for the reduced ones."""
        sources = list(sources)
        pairs = list(zip(sources, self.gradient(target, sources, output_gradients)))
        return ([p for p in pairs if id(p[0]) in self._local], [p for p in pairs if id(p[0]) not in self._local])


def PartialDistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "", device_sparse: str = "",
                                   compression: Any = Compression.none, sparse_as_dense: bool = False,
                                   op: Any = Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                                   groups: Any = None, process_set: Any = None, local_layers: Any = None,
                                   scale_local_gradients: bool = True) -> DistributedGradientTape:
    """A :class:`DistributedGradientTape` that keeps the gradients of ``local_layers`` (a Keras
    layer or a list of them) on each rank."""
    tape = DistributedGradientTape(gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
                                   gradient_predivide_factor, num_groups, groups, process_set, scale_local_gradients)
    layers = [] if local_layers is None else local_layers if isinstance(local_layers, (list, tuple)) else [local_layers]
    for layer in layers:
        for v in layer.trainable_weights:
            tape.register_local_source(v)
    return tape
