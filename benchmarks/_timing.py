"""The benchmarks' one way to time collectives side by side: every side called once per
repetition, in an order that rotates, each call after a barrier; a repetition's wall-clock time
is the slowest rank's, its CPU time the sum over the ranks (each process's, all its threads:
Gloo's and any background thread's included). On a shared, loaded machine the wall-clock time
mostly measures the other programs' share of the cores, which CPU time leaves out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def timed(fn: Callable[[], object], reset: Callable[[], object] | None = None) -> tuple[float, float]:
    """Seconds of wall-clock time and of this process's CPU time that one call of ``fn`` took,
    after ``reset`` (untimed) and a barrier."""
    if reset is not None:
        reset()
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(sides: Sequence[Callable[[], object]], reps: int, reset: Callable[[], object] | None = None,
                warmup: int = 2) -> tuple[list[list[float]], list[list[float]]]:
    """``reps`` repetitions of every side (after ``warmup`` untimed ones: connections, allocator,
    the reducers' buffers); repetition i starts with side i mod len(sides), so that no side
    always follows another. Returns (wall, cpu): per repetition, seconds per side, wall the
    slowest rank's and cpu summed over the ranks; every rank gets the same lists."""
    for _ in range(warmup):
        for fn in sides:
            timed(fn, reset)
    k = len(sides)
    wall = torch.empty(reps, k, dtype=torch.float64)
    cpu = torch.empty(reps, k, dtype=torch.float64)
    for i in range(reps):
        for j in range(k):
            column = (i + j) % k
            wall[i, column], cpu[i, column] = timed(sides[column], reset)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the slowest rank decides
    dist.all_reduce(cpu)  # the work of all ranks
    return wall.tolist(), cpu.tolist()


def median_ms(samples: Sequence[Sequence[float]], side: int) -> float:
    """The median over repetitions of one side's time, in ms."""
    return statistics.median(s[side] for s in samples) * 1e3


def ratios(samples: Sequence[Sequence[float]], side: int, base: int) -> list[float]:
    """Per repetition, ``side``'s time over ``base``'s (repetitions where ``base`` took no
    measurable time, as a CPU clock can report, are left out)."""
    return [s[side] / s[base] for s in samples if s[base] > 0]


def ratio_cells(samples: Sequence[Sequence[float]], side: int, base: int) -> tuple[str, str]:
    """The median of the per-repetition ratios and their range, as table cells."""
    r = ratios(samples, side, base)
    return f"{statistics.median(r):.2f}x", f"{min(r):.2f}-{max(r):.2f}x"
