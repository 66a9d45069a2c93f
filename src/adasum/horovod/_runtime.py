"""The process group behind ``hvd.init()``, and the ranks and sizes Horovod's scripts ask for.

Horovod started its own runtime (MPI or Gloo) under ``horovodrun``; here the runtime is
torch.distributed's default process group, started from the environment ``torchrun`` sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A group the
program already initialised is adopted as it is, so ``hvd.init()`` also works inside code that
set torch.distributed up itself (and then ``hvd.shutdown()`` leaves that group alone).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    "cross_rank", "cross_size", "group_of", "nccl_built", "gloo_built", "mpi_built",
    "cuda_built", "mpi_enabled", "gloo_enabled", "ccl_built", "ddl_built", "rocm_built",
]

#: The variables ``init`` needs when no process group exists yet.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class _Topology:
    """Where this process sits: globally, on its node, and among the nodes."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    owns_group: bool  # init created the default group, so shutdown destroys it


_state: _Topology | None = None
_starts = 0  # how often init has started a process group (see _rendezvous)


def init(comm: object = None, process_sets: object = None) -> None:
    """Start (or adopt) the default process group and record this process's place.

    Without an initialised torch.distributed group the environment of ``torchrun`` must be
    present; the backend is Gloo for CPU tensors and, where CUDA is available, NCCL for CUDA
    tensors too (``"cpu:gloo,cuda:nccl"``, so small CPU tensors such as metrics still work),
    and the current CUDA device becomes LOCAL_RANK's. Calling it again does nothing.
    Horovod's ``comm`` (an MPI communicator) and ``process_sets`` have no counterpart: pass a
    ``torch.distributed`` group as ``process_set=`` to an operation instead.
    """
    global _state
    if comm is not None or process_sets is not None:
        raise NotImplementedError(
            "adasum.horovod.init: MPI communicators and process sets are not supported; launch "
            "with torchrun and pass a torch.distributed group as process_set= to an operation"
        )
    if _state is not None:
        return
    owns = not dist.is_initialized()
    if owns:
        _start_group()
    _state = _topology(owns)


def _start_group() -> None:
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"adasum.horovod.init: {', '.join(missing)} not set; launch with torchrun "
            "(torchrun --nproc-per-node=N script.py replaces horovodrun -np N python script.py)"
        )
    store, rank_, size_ = _rendezvous()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=rank_, world_size=size_)
    else:
        dist.init_process_group("gloo", store=store, rank=rank_, world_size=size_)


def _rendezvous() -> tuple[dist.Store, int, int]:
    """torchrun's store, under a prefix of its own for each start of the runtime.

    torch.distributed names the default group the same way every time, so a group started
    again after ``shutdown()`` would read the previous group's keys still in torchrun's store
    (the peers' old addresses) and wait forever. Every rank starts the runtime equally often,
    so the counter agrees across ranks.
    """
    global _starts
    store, rank_, size_ = next(dist.rendezvous("env://", timeout=default_pg_timeout))
    store.set_timeout(default_pg_timeout)
    _starts += 1
    return dist.PrefixStore(f"adasum.horovod/{_starts}", store), rank_, size_


def _topology(owns: bool) -> _Topology:
    """This process's place. torchrun numbers ranks node by node (rank = node * local_size +
    local_rank on equal nodes); without its LOCAL_* variables the ranks compare host names."""
    r, n = dist.get_rank(), dist.get_world_size()
    if "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        local_r, local_n = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        return _Topology(r, n, local_r, local_n, r // local_n, max(1, n // local_n), owns)
    hosts: list = [None] * n
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = list(dict.fromkeys(hosts))  # in order of first appearance
    mine = [i for i, h in enumerate(hosts) if h == hosts[r]]
    return _Topology(r, n, mine.index(r), len(mine), nodes.index(hosts[r]), len(nodes), owns)


def shutdown() -> None:
    """Forget the runtime; destroy the default process group if :func:`init` created it."""
    global _state
    if _state is not None and _state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _state = None


def is_initialized() -> bool:
    """Whether :func:`init` has run (and :func:`shutdown` has not since)."""
    return _state is not None


def _topo() -> _Topology:
    if _state is None:
        raise ValueError("adasum.horovod has not been initialized; call hvd.init() first")
    return _state


def rank() -> int:
    """This process's rank among all processes."""
    return _topo().rank


def size() -> int:
    """The number of processes."""
    return _topo().size


def local_rank() -> int:
    """This process's rank among the processes on its node."""
    return _topo().local_rank


def local_size() -> int:
    """The number of processes on this node."""
    return _topo().local_size


def cross_rank() -> int:
    """The index of this process's node."""
    return _topo().cross_rank


def cross_size() -> int:
    """The number of nodes."""
    return _topo().cross_size


def group_of(process_set: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The torch.distributed group an operation runs on (None: every process), after checking
    that :func:`init` has run."""
    _topo()
    if process_set is not None and not isinstance(process_set, dist.ProcessGroup):
        raise NotImplementedError(
            f"adasum.horovod: process_set must be None or a torch.distributed ProcessGroup, got "
            f"{type(process_set).__name__}; Horovod's ProcessSet objects are not supported"
        )
    return process_set


# What Horovod's scripts ask about the build. There is no build here: these say what
# torch.distributed offers, which is what the operations run on.

def nccl_built() -> bool:
    """Whether CUDA tensors can be reduced (torch has NCCL and a GPU is present)."""
    return dist.is_nccl_available() and torch.cuda.is_available()


def gloo_built() -> bool:
    return dist.is_gloo_available()


def gloo_enabled() -> bool:
    return dist.is_gloo_available()


def cuda_built() -> bool:
    return torch.cuda.is_available()


def mpi_built() -> bool:
    """False: the operations never run on MPI."""
    return False


def mpi_enabled() -> bool:
    return False


def ccl_built() -> bool:
    """False: no oneCCL; CPU tensors travel over Gloo."""
    return False


def ddl_built() -> bool:
    """False: no IBM DDL."""
    return False


def rocm_built() -> bool:
    """Whether GPU tensors are ROCm tensors (a ROCm build of torch with a GPU present)."""
    return torch.version.hip is not None and torch.cuda.is_available()
