"""Horovod's Keras API for Keras 3 on the TensorFlow backend: change ``import
horovod.tensorflow.keras as hvd`` (or ``import horovod.keras as hvd``) to ``import
adasum.horovod.keras as hvd`` and launch with ``torchrun``.

    hvd.init(); hvd.rank(), hvd.size(), ...                       the runtime of adasum.horovod
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.01), op=hvd.Adasum)
    model.compile(optimizer=opt, loss=...)
    model.fit(..., callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                              hvd.callbacks.MetricAverageCallback(),
                              hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.01)])

The optimizer is :class:`adasum.keras.DistributedOptimizer` (the project's engine) behind
Horovod's signature. What differs from Horovod and what is not offered: docs/horovod.md.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from adasum.horovod import (
    Adasum,
    Average,
    HorovodInternalError,
    MismatchError,
    Sum,
    cross_rank,
    cross_size,
    cuda_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    init,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    nccl_built,
    rank,
    shutdown,
    size,
)
from adasum.horovod._missing import not_offered
from adasum.horovod.keras import callbacks
from adasum.horovod.keras._optimizer import DistributedOptimizer
from adasum.horovod.tensorflow import Compression, _ops, broadcast_variables

if keras.backend.backend() != "tensorflow":  # Horovod's Keras API was TensorFlow's
    raise ImportError(f"adasum.horovod.keras needs Keras's TensorFlow backend (KERAS_BACKEND=tensorflow), not "
                      f"{keras.backend.backend()!r}; on the torch backend use adasum.keras")

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "nccl_built", "gloo_built", "gloo_enabled", "mpi_built", "mpi_enabled", "cuda_built", "global_process_set",
    "Average", "Sum", "Adasum", "Compression", "DistributedOptimizer", "callbacks", "broadcast_variables",
    "allreduce", "allgather", "broadcast", "MismatchError", "HorovodInternalError",
]


def allreduce(value: Any, name: str | None = None, average: bool | None = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, op: Any = None, compression: Any = Compression.none) -> np.ndarray:
    """The reduction of a tensor-like ``value`` over all ranks (default: the average), as a
    NumPy array."""
    return _ops.allreduce(tf.constant(value), average=average, compression=compression, op=op,
                          prescale_factor=prescale_factor, postscale_factor=postscale_factor, name=name).numpy()


def allgather(value: Any, name: str | None = None) -> np.ndarray:
    """Every rank's ``value`` concatenated along dimension 0 in rank order, as a NumPy array."""
    return _ops.allgather(tf.constant(value), name=name).numpy()


def broadcast(value: Any, root_rank: int, name: str | None = None) -> np.ndarray:
    """``value`` as ``root_rank`` holds it, on every rank, as a NumPy array."""
    return _ops.broadcast(tf.constant(value), root_rank, name=name).numpy()


def _missing(name: str, instead: str):
    return not_offered("adasum.horovod.keras", name, instead)


# Horovod names with no counterpart here: calling one says what to use instead.
PartialDistributedOptimizer = _missing(
    "PartialDistributedOptimizer", "use hvd.DistributedOptimizer (every trainable variable is combined), or "
    "adasum.horovod.tensorflow.PartialDistributedGradientTape in a custom training loop")
broadcast_global_variables = _missing(
    "broadcast_global_variables", "use hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank) or "
    "hvd.broadcast_variables(model.variables, root_rank)")
load_model = _missing(
    "load_model", "load with keras.models.load_model(path, compile=False) and compile it with a new "
    "hvd.DistributedOptimizer")
reducescatter = _missing("reducescatter", "use hvd.allreduce and take this rank's slice")
start_timeline = _missing("start_timeline", "use tf.profiler")
stop_timeline = _missing("stop_timeline", "use tf.profiler")
mpi_threads_supported = _missing("mpi_threads_supported", "there is no MPI here")

__all__ += ["PartialDistributedOptimizer", "broadcast_global_variables", "load_model", "reducescatter",
            "start_timeline", "stop_timeline", "mpi_threads_supported"]
