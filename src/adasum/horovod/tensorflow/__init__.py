"""Horovod's TensorFlow 2 API on this library's engine: change ``import horovod.tensorflow as
hvd`` to ``import adasum.horovod.tensorflow as hvd`` and launch with ``torchrun``.

    hvd.init(); hvd.rank(), hvd.size(), hvd.local_rank(), ...   the runtime of adasum.horovod
    hvd.allreduce(t, op=hvd.Adasum)                             eager and inside tf.function
    hvd.grouped_allreduce / allgather / grouped_allgather / broadcast / alltoall / reducescatter
    tape = hvd.DistributedGradientTape(tape, op=hvd.Adasum)      reduced gradients
    hvd.broadcast_variables(model.variables, root_rank=0)

The runtime is adasum.horovod's (torch.distributed's default process group, started by
``hvd.init()`` from torchrun's environment or adopted); every operation is the PyTorch one,
reached through DLPack, so the ranks agree on their inputs first and a mismatch raises
:class:`MismatchError` on every rank. Keras: :mod:`adasum.horovod.keras`. What differs from
Horovod and what is not offered: docs/horovod.md.
"""

import tensorflow as tf

from adasum.horovod import (
    Adasum,
    Average,
    HorovodInternalError,
    Max,
    Min,
    Product,
    ReduceOp,
    Sum,
    allgather_object,
    broadcast_object,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
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
    rocm_built,
    shutdown,
    size,
)
from adasum.horovod._missing import not_offered
from adasum.horovod.tensorflow import util  # noqa: F401 (Horovod's hvd.util._executing_eagerly)
from adasum.horovod.tensorflow._bridge import InvalidInputError, MismatchError
from adasum.horovod.tensorflow._ops import (
    Compression,
    allgather,
    allreduce,
    broadcast,
    broadcast_,
    broadcast_global_variables,
    broadcast_variables,
    grouped_allgather,
    grouped_allreduce,
)
from adasum.horovod.tensorflow._scatter import alltoall, grouped_reducescatter, reducescatter
from adasum.horovod.tensorflow._tape import DistributedGradientTape, PartialDistributedGradientTape
from adasum.horovod.tensorflow.util import _executing_eagerly  # noqa: F401 (Horovod's hvd._executing_eagerly)

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "nccl_built", "gloo_built", "gloo_enabled", "mpi_built", "mpi_enabled", "cuda_built", "global_process_set",
    "ccl_built", "ddl_built", "rocm_built", "gpu_available", "rank_op", "size_op", "local_rank_op", "local_size_op",
    "ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression",
    "allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast", "broadcast_",
    "alltoall", "reducescatter", "grouped_reducescatter",
    "broadcast_variables", "broadcast_global_variables", "broadcast_object", "allgather_object",
    "DistributedGradientTape", "PartialDistributedGradientTape",
    "DistributedOptimizer", "MismatchError", "InvalidInputError", "HorovodInternalError",
]


def DistributedOptimizer(optimizer, name=None, use_locking=False, **kwargs):  # noqa: N802 (Horovod's name)
    """Horovod's ``hvd.DistributedOptimizer`` for a Keras optimizer: the same as
    :class:`adasum.horovod.keras.DistributedOptimizer` with the same keyword arguments
    (``use_locking`` belonged to TensorFlow 1's optimizers and is ignored). TensorFlow 1's
    optimizers do not exist in TensorFlow 2, so nothing else is accepted."""
    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"adasum.horovod.tensorflow.DistributedOptimizer wraps a keras.optimizers.Optimizer, "
                        f"got {type(optimizer).__name__}; for a custom loop use hvd.DistributedGradientTape")
    from adasum.horovod.keras._optimizer import DistributedOptimizer as keras_optimizer

    return keras_optimizer(optimizer, name=name, **kwargs)


def gpu_available(ext_base_name: str = "tensorflow", verbose: bool = False) -> bool:
    """Whether the operations can run on a GPU here: they are torch's, so whether torch sees CUDA
    (Horovod asked whether its extension was built with GPU support)."""
    return cuda_built()


# Horovod's graph-friendly forms of the topology: here constant tensors (the values cannot
# change while the runtime is up).
def rank_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(rank(), name=name)


def size_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(size(), name=name)


def local_rank_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(local_rank(), name=name)


def local_size_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(local_size(), name=name)


def _missing(name: str, instead: str):
    return not_offered("adasum.horovod.tensorflow", name, instead)


# Horovod names with no counterpart here: calling one says what to use instead.
join = _missing("join", "give every rank the same number of batches (adasum.horovod.join for torch)")
BroadcastGlobalVariablesHook = _missing(
    "BroadcastGlobalVariablesHook", "use hvd.broadcast_variables or adasum.horovod.keras.callbacks")
SyncBatchNormalization = _missing("SyncBatchNormalization", "normalize per rank with keras.layers.BatchNormalization")
broadcast_object_fn = _missing("broadcast_object_fn", "call hvd.broadcast_object eagerly")
start_timeline = _missing("start_timeline", "use tf.profiler")
stop_timeline = _missing("stop_timeline", "use tf.profiler")
ProcessSet = _missing("ProcessSet", "pass torch.distributed.new_group(ranks) as process_set=")
add_process_set = _missing("add_process_set", "pass torch.distributed.new_group(ranks) as process_set=")
remove_process_set = _missing("remove_process_set", "destroy the torch.distributed group you made")
mpi_threads_supported = _missing("mpi_threads_supported", "there is no MPI here")

__all__ += [
    "join", "BroadcastGlobalVariablesHook",
    "SyncBatchNormalization", "broadcast_object_fn", "start_timeline", "stop_timeline", "ProcessSet", "add_process_set",
    "remove_process_set", "mpi_threads_supported",
]
