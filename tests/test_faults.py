"""A rank that dies in the middle of a reduction: the survivors raise, within the process group's
timeout, on every path (flat collective on both algorithms, DDP hook, hierarchical mode,
delta-mode optimizer, with and without overlap), instead of waiting forever.

Each path runs in a group of 4 fresh processes whose process-group timeout is GROUP_TIMEOUT
seconds; rank 3 kills itself (SIGKILL, as a crashed or preempted worker) at a point where its
partners are waiting for its data. The survivors report how long the failing call took.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import adasum
from adasum import _adasum, _hierarchical, _vhdd
from adasum.ddp import AdasumState, adasum_hook
from adasum.launch import WorkerError, spawn
from adasum.optim import DistributedOptimizer
from conftest import TIMEOUT

GROUP_TIMEOUT = 6.0
VICTIM = 3
#: Time on top of the group's timeout for a survivor to notice and raise (2 shared cores).
SLACK = 20.0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_victim_at(rank: int, module, name: str) -> None:
    """On the victim, replace ``module.name`` by a function that kills the process."""
    if rank == VICTIM:
        setattr(module, name, lambda *args, **kwargs: _die())


def _flat_call(rank: int, algorithm: str):
    if algorithm == "vhdd":  # after the halving: the partners wait for the halves back
        _kill_victim_at(rank, _vhdd, "all_gather")
    else:  # in the all-gather of every rank's buffer
        _kill_victim_at(rank, _adasum, "all_gather_single")
    reducer = adasum.Adasum(algorithm=algorithm)
    return lambda: reducer.all_reduce([torch.randn(1000), torch.randn(300, dtype=torch.float64)])


def _hook_call(rank: int):
    _kill_victim_at(rank, _vhdd, "all_gather")
    model = DDP(torch.nn.Linear(50, 20))
    model.register_comm_hook(AdasumState(adasum.Adasum(algorithm="vhdd")), adasum_hook)
    return lambda: model(torch.randn(8, 50)).sum().backward()


def _hierarchical_call(rank: int):
    _kill_victim_at(rank, _hierarchical, "all_gather_single")  # the node's share gather
    reducer = adasum.Hierarchical(2)
    return lambda: reducer.all_reduce([torch.randn(1000), torch.randn(300)])


def _optimizer_call(rank: int):
    _kill_victim_at(rank, _vhdd, "all_gather")
    model = torch.nn.Linear(50, 20)
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters()), adasum.Adasum(algorithm="vhdd"))
    model(torch.randn(8, 50)).sum().backward()
    return opt.step


def _overlap_call(rank: int):
    # The bucket is reduced on the background thread during backward; step() meets the error.
    _kill_victim_at(rank, _vhdd, "all_gather")
    model = torch.nn.Linear(50, 20)
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters()), adasum.Adasum(algorithm="vhdd"), overlap=True)

    def update() -> None:
        opt.zero_grad()
        model(torch.randn(8, 50)).sum().backward()
        opt.step()

    return update


PATHS = {
    "flat-vhdd": lambda rank: _flat_call(rank, "vhdd"),
    "flat-gather": lambda rank: _flat_call(rank, "gather"),
    "hook": _hook_call,
    "hierarchical": _hierarchical_call,
    "optimizer": _optimizer_call,
    "optimizer-overlap": _overlap_call,
}


def _survive(rank: int, world: int, path: str) -> dict:
    """Call the path until it fails (a survivor that needs nothing from the victim, such as the
    other node's ranks in hierarchical mode, finishes the first call and fails in the next).
    A survivor stays alive after its error for longer than the group's timeout, as a process
    that catches the error would: its exit must not be what unblocks the others."""
    call = PATHS[path](rank)
    for _ in range(3):
        start = time.monotonic()
        try:
            call()
        except RuntimeError as e:
            seconds = time.monotonic() - start
            time.sleep(GROUP_TIMEOUT + 2)
            return {"seconds": seconds, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    return {"seconds": None, "error": None}


@pytest.mark.parametrize("path", list(PATHS))
def test_survivors_raise_within_the_group_timeout(path):
    results = spawn(_survive, 4, path, timeout=TIMEOUT, group_timeout=GROUP_TIMEOUT, may_exit={VICTIM})
    assert results[VICTIM] is None
    for rank, res in enumerate(results[:VICTIM]):
        assert res["error"] is not None, (path, rank)
        assert res["seconds"] < GROUP_TIMEOUT + SLACK, (path, rank, res)


def _crash(rank: int, world: int) -> None:
    if rank == 1:
        _die()
    time.sleep(30)


def test_a_dead_worker_is_named_with_its_signal():
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"^worker 1 was killed by signal 9 \(SIGKILL\)$"):
        spawn(_crash, 2, timeout=TIMEOUT)
    assert time.monotonic() - start < 25
