"""Horovod's PyTorch API on torch.distributed: change ``import horovod.torch as hvd`` to
``import adasum.horovod as hvd`` and launch with ``torchrun`` instead of ``horovodrun``.

    hvd.init(); hvd.rank(), hvd.size(), hvd.local_rank(), ...   the runtime (_runtime)
    hvd.allreduce(t, op=hvd.Adasum)                             Adasum for any number of ranks
    hvd.allreduce / allgather / broadcast / alltoall / reducescatter / barrier / join
    hvd.DistributedOptimizer(opt, named_parameters=..., op=hvd.Adasum)    gradient or delta mode
    hvd.broadcast_parameters(model.state_dict(), root_rank=0), hvd.broadcast_optimizer_state(...)
    hvd.elastic.run, hvd.elastic.TorchState, hvd.elastic.ElasticSampler     elastic training (elastic/)

Every operation starts with the ranks agreeing on what they pass: mismatched shapes, dtypes,
operations or arguments make every rank raise :class:`MismatchError` instead of hanging.
What differs from Horovod and what is not offered: docs/horovod.md.
"""

from adasum.horovod import elastic
from adasum.horovod._agree import MismatchError
from adasum.horovod._allreduce import (
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
)
from adasum.horovod._collectives import (
    allgather,
    allgather_async,
    alltoall,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    grouped_allgather,
    grouped_allgather_async,
    join,
    reducescatter,
)
from adasum.horovod._handles import Handle, HorovodInternalError, poll, synchronize
from adasum.horovod._missing import not_offered
from adasum.horovod._objects import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from adasum.horovod._optimizer import DistributedOptimizer
from adasum.horovod._reduce_ops import Adasum, Average, Compression, Max, Min, Product, ReduceOp, Sum
from adasum.horovod._runtime import (
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
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

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size", "cross_rank", "cross_size",
    "nccl_built", "gloo_built", "gloo_enabled", "mpi_built", "mpi_enabled", "cuda_built",
    "ccl_built", "ddl_built", "rocm_built",
    "ReduceOp", "Average", "Sum", "Adasum", "Min", "Max", "Product", "Compression",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall", "reducescatter",
    "barrier", "join", "synchronize", "poll", "Handle",
    "broadcast_object", "allgather_object", "broadcast_parameters", "broadcast_optimizer_state",
    "DistributedOptimizer", "MismatchError", "HorovodInternalError", "global_process_set", "elastic",
]


#: Horovod's name for "every process": operations take ``process_set=None`` for that.
global_process_set = None


def _not_offered(name: str, instead: str):
    return not_offered("adasum.horovod", name, instead)


# Horovod names with no counterpart here: calling one says what to use instead.
SyncBatchNorm = _not_offered("SyncBatchNorm", "use torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)")
start_timeline = _not_offered("start_timeline", "use torch.profiler")
stop_timeline = _not_offered("stop_timeline", "use torch.profiler")
add_process_set = _not_offered("add_process_set", "pass torch.distributed.new_group(ranks) as process_set=")
remove_process_set = _not_offered("remove_process_set", "destroy the torch.distributed group you made")
ProcessSet = _not_offered("ProcessSet", "pass torch.distributed.new_group(ranks) as process_set=")
sparse_allreduce_async = _not_offered("sparse_allreduce_async", "use DistributedOptimizer(..., sparse_as_dense=True)")
grouped_reducescatter = _not_offered("grouped_reducescatter", "call reducescatter on each tensor")
reducescatter_async = _not_offered("reducescatter_async", "use reducescatter (blocking)")
alltoall_async = _not_offered("alltoall_async", "use alltoall (blocking)")
mpi_threads_supported = _not_offered("mpi_threads_supported", "there is no MPI here")

__all__ += [
    "SyncBatchNorm", "start_timeline", "stop_timeline", "add_process_set", "remove_process_set", "ProcessSet",
    "sparse_allreduce_async", "grouped_reducescatter", "reducescatter_async", "alltoall_async",
    "mpi_threads_supported",
]
