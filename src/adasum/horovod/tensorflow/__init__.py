"""Horovod's TensorFlow 2 API on this library's engine: change ``import horovod.tensorflow as
hvd`` to ``import adasum.horovod.tensorflow as hvd`` and launch with ``torchrun``.

    hvd.init(); hvd.rank(), hvd.size(), hvd.local_rank(), ...   the runtime of adasum.horovod
    hvd.allreduce(t, op=hvd.Adasum)                             eager and inside tf.function
    hvd.grouped_allreduce / allgather / grouped_allgather / broadcast
    tape = hvd.DistributedGradientTape(tape, op=hvd.Adasum)      reduced gradients
    hvd.broadcast_variables(model.variables, root_rank=0)

The runtime is adasum.horovod's (torch.distributed's default process group, started by
``hvd.init()`` from torchrun's environment or adopted); every operation is the PyTorch one,
reached through DLPack, so the ranks agree on their inputs first and a mismatch raises
:class:`MismatchError` on every rank. Keras: :mod:`adasum.horovod.keras`. What differs from
Horovod and what is not offered: docs/horovod.md.
"""

from adasum.horovod import (
    Adasum,
    Average,
    HorovodInternalError,
    Max,
    Min,
    MismatchError,
    Product,
    ReduceOp,
    Sum,
    allgather_object,
    broadcast_object,
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
from adasum.horovod.tensorflow._ops import (
    Compression,
    allgather,
    allreduce,
    broadcast,
    broadcast_variables,
    grouped_allgather,
    grouped_allreduce,
)
from adasum.horovod.tensorflow._tape import DistributedGradientTape, PartialDistributedGradientTape

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "nccl_built", "gloo_built", "gloo_enabled", "mpi_built", "mpi_enabled", "cuda_built", "global_process_set",
    "ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression",
    "allreduce", "grouped_allreduce", "allgather", "grouped_allgather", "broadcast", "broadcast_variables",
    "broadcast_object", "allgather_object", "DistributedGradientTape", "PartialDistributedGradientTape",
    "DistributedOptimizer", "MismatchError", "HorovodInternalError",
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


def _missing(name: str, instead: str):
    return not_offered("adasum.horovod.tensorflow", name, instead)


# Horovod names with no counterpart here: calling one says what to use instead.
reducescatter = _missing("reducescatter", "use hvd.allreduce and take this rank's slice")
grouped_reducescatter = _missing("grouped_reducescatter", "use hvd.grouped_allreduce and take this rank's slices")
alltoall = _missing("alltoall", "use adasum.horovod.alltoall on torch tensors")
join = _missing("join", "give every rank the same number of batches (adasum.horovod.join for torch)")
broadcast_ = _missing("broadcast_", "use hvd.broadcast_variables(variables, root_rank)")
broadcast_global_variables = _missing(
    "broadcast_global_variables", "TensorFlow 1's global variables do not exist in TensorFlow 2; use "
    "hvd.broadcast_variables(model.variables, root_rank)")
BroadcastGlobalVariablesHook = _missing(
    "BroadcastGlobalVariablesHook", "use hvd.broadcast_variables or adasum.horovod.keras.callbacks")
SyncBatchNormalization = _missing("SyncBatchNormalization", "normalize per rank with keras.layers.BatchNormalization")
broadcast_object_fn = _missing("broadcast_object_fn", "call hvd.broadcast_object eagerly")
size_op = _missing("size_op", "hvd.size() is a Python int; tf.constant(hvd.size()) inside a graph")
rank_op = _missing("rank_op", "hvd.rank() is a Python int; tf.constant(hvd.rank()) inside a graph")
local_size_op = _missing("local_size_op", "tf.constant(hvd.local_size())")
local_rank_op = _missing("local_rank_op", "tf.constant(hvd.local_rank())")
start_timeline = _missing("start_timeline", "use tf.profiler")
stop_timeline = _missing("stop_timeline", "use tf.profiler")
ProcessSet = _missing("ProcessSet", "pass torch.distributed.new_group(ranks) as process_set=")
add_process_set = _missing("add_process_set", "pass torch.distributed.new_group(ranks) as process_set=")
remove_process_set = _missing("remove_process_set", "destroy the torch.distributed group you made")
mpi_threads_supported = _missing("mpi_threads_supported", "there is no MPI here")

__all__ += [
    "reducescatter", "grouped_reducescatter", "alltoall", "join", "broadcast_", "broadcast_global_variables",
    "BroadcastGlobalVariablesHook", "SyncBatchNormalization", "broadcast_object_fn", "size_op", "rank_op",
    "local_size_op", "local_rank_op", "start_timeline", "stop_timeline", "ProcessSet", "add_process_set",
    "remove_process_set", "mpi_threads_supported",
]
