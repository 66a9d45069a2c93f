"""Start N local worker processes with a torch.distributed process group.

The tests, the benchmarks and ``adasum train --nproc N`` all run their workers through
:func:`spawn`; under ``torchrun`` the program uses its environment instead. A worker that fails
or hangs never hangs the caller: the first error or the deadline ends every worker.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["spawn", "WorkerError", "free_port"]


class WorkerError(RuntimeError):
    """A worker raised or died; the message names its rank (and holds its traceback)."""


def _death(rank: int, exitcode: int) -> str:
    """One line on how worker ``rank`` ended without a result."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        return f"worker {rank} was killed by signal {-exitcode} ({name})"
    return f"worker {rank} exited with status {exitcode} before returning"


#: Seconds a worker's failure report waits for a peer's death to show (see :func:`_killed`).
_SETTLE = 0.1


def _killed(procs: list, reporter: int, may_exit: Collection[int]) -> str | None:
    """The death of a worker killed by a signal, if one was. A killed worker makes its peers
    fail on the lost connection, and a peer's report can arrive before the death is seen: the
    death is the cause, so it is named instead."""
    others = [p.sentinel for r, p in enumerate(procs) if r != reporter]
    mp.connection.wait(others, timeout=_SETTLE)
    for r, p in enumerate(procs):
        if r not in may_exit and p.exitcode is not None and p.exitcode < 0:
            return _death(r, p.exitcode)
    return None


@contextlib.contextmanager
def _sigint_ignored():
    """Start workers with SIGINT ignored (a disposition that exec keeps). Ctrl-C in a terminal
    reaches the whole process group; the caller alone takes it and ends every worker, rather
    than each worker printing its own traceback or failing a peer first."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers; its caller owns Ctrl-C
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    """A TCP port on localhost that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> Any:  # a multiprocessing context (its Process class is per context)
    """Fresh processes that need not import torch again: where the platform offers it, children
    of a server process (started once, on the first call) that has imported torch, which starts
    a worker in a tenth of a second instead of seconds; else plain "spawn". Nothing else is
    imported in the server, so a worker imports TensorFlow or JAX under its own environment.
    ``torch._dynamo`` is preloaded too: every optimizer's first ``step`` imports it (seconds per
    process on a loaded machine), and workers mostly build an optimizer."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "adasum.launch"])
    return ctx


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(
    fn: Callable, rank: int, world_size: int, port: int, backend: str, timeout: float,
    threads: int, env: dict[str, str], args: tuple, results: mp.Queue,
) -> None:
    # The caller's environment as it is now, as a fresh process would have it (a forkserver's
    # child starts with the server's), then the variables the caller adds.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(world_size)),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, _dumps(out)))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit
        results.put((rank, False, traceback.format_exc()))


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 300.0,
    group_timeout: float | None = None,
    may_exit: Collection[int] = (),
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes, each with the default
    process group initialised; return the ranks' return values in rank order.

    ``fn`` must be importable by name (a module-level function). Raises :class:`WorkerError`
    with the failing rank's traceback if any worker raises, or naming the rank and signal if a
    worker dies, and TimeoutError naming the unfinished ranks after ``timeout`` seconds; every
    worker is ended either way. ``group_timeout`` is the process group's timeout (default
    ``timeout``). Ranks in ``may_exit`` may end without returning (a fault test's victims):
    their value is None. The workers ignore SIGINT: Ctrl-C interrupts the caller, which ends
    them.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, nprocs, port, backend, group_timeout or timeout, threads, {**os.environ, **(env or {})}, args,
                  results),
            daemon=True,
        )
        for rank in range(nprocs)
    ]
    with _sigint_ignored():
        for p in procs:
            p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                for r in may_exit:
                    if r not in outputs and procs[r].exitcode is not None:
                        outputs[r] = None
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(_death(dead[0], procs[dead[0]].exitcode)) from None
                if time.monotonic() >= deadline:
                    missing = sorted(set(range(nprocs)) - set(outputs))
                    raise TimeoutError(f"workers {missing} did not finish within {timeout:g} s") from None
                continue
            if not ok:
                raise WorkerError(_killed(procs, rank, may_exit) or f"worker {rank} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outputs) == nprocs else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(nprocs)]
