"""Horovod's Keras ``DistributedOptimizer``, on :class:`adasum.keras.DistributedOptimizer`.

``op=Average`` and ``op=Sum`` reduce the gradients and then step the wrapped optimizer
(gradient mode), as Horovod did. ``op=Adasum``, which Horovod's Keras optimizer refused, runs
delta mode: every rank steps the wrapped optimizer on its own gradients and the weight changes
are combined with Adasum (how the paper uses Adam and LAMB, and what ``op=Adasum`` means in
adasum.horovod's PyTorch optimizer).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

import adasum
from adasum.horovod._reduce_ops import Adasum, Average, Sum
from adasum.horovod._runtime import group_of
from adasum.horovod.tensorflow._ops import Compression
from adasum.keras import DistributedOptimizer as _Engine

__all__ = ["DistributedOptimizer"]

_REDUCERS = {Average: adasum.Average, Sum: adasum.Sum, Adasum: adasum.Adasum}


class DistributedOptimizer(_Engine):
    """Wrap a Keras optimizer so that every update combines the ranks' (module docstring);
    Horovod's signature. Every rank starts from the same weights
    (``callbacks.BroadcastGlobalVariablesCallback(0)`` or ``hvd.broadcast_variables``).

    ``backward_passes_per_step=k`` updates once per k batches with the sum of their gradients
    (their mean with ``average_aggregated_gradients=True``), communicating once per update.
    ``compression`` other than ``Compression.none`` and ``gradient_predivide_factor`` other
    than 1 are refused (NotImplementedError); ``sparse_as_dense`` is accepted (gradients always
    travel dense), as are ``device_*``, ``num_groups`` and ``groups`` (one operation per dtype).
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, name: str | None = None, device_dense: str = "",
                 device_sparse: str = "", compression: Any = Compression.none, sparse_as_dense: bool = False,
                 gradient_predivide_factor: float = 1.0, op: Any = Average, backward_passes_per_step: int = 1,
                 average_aggregated_gradients: bool = False, num_groups: int = 0, groups: Any = None,
                 process_set: Any = None, scale_local_gradients: bool = True) -> None:
        if op not in _REDUCERS:
            raise ValueError(f"op must be hvd.Average, hvd.Sum or hvd.Adasum, got {op!r}")
        if compression is not Compression.none:
            raise NotImplementedError("adasum.horovod.keras.DistributedOptimizer: compression is not offered; "
                                      "train in bfloat16 or float16 to halve the bytes")
        if gradient_predivide_factor != 1.0:
            raise NotImplementedError("adasum.horovod.keras.DistributedOptimizer: gradient_predivide_factor is not "
                                      "offered; the average is summed in float32 or wider, so it is not needed")
        reducer = _REDUCERS[op](group_of(process_set))
        super().__init__(optimizer, reducer, mode="delta" if op == Adasum else "gradient",
                         gradient_accumulation_steps=backward_passes_per_step, name=name)
        self.op, self.average_aggregated = op, bool(average_aggregated_gradients)

    def update(self, grads: list, variables: list) -> Any:
        # The engine averages accumulated gradients (Keras's meaning); Horovod summed them unless
        # told to average. Whatever the engine's update returns is passed on unchanged.
        if self.accumulation_steps > 1 and not self.average_aggregated:
            grads = [g if g is None else ops.multiply(g, self.accumulation_steps) for g in grads]
        return super().update(grads, variables)

    def register_local_var(self, var: Any) -> None:
        raise NotImplementedError("adasum.horovod.keras.DistributedOptimizer: local variables are not offered; "
                                  "every trainable variable is combined (use hvd.PartialDistributedGradientTape "
                                  "in a custom training loop)")

    def get_config(self) -> dict[str, Any]:
        # The process set is not saved: a loaded optimizer runs over every rank.
        return {"name": self.name, "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "op": int(self.op), "backward_passes_per_step": self.accumulation_steps,
                "average_aggregated_gradients": self.average_aggregated}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> DistributedOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
