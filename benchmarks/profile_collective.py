"""Where the time of one VHDD all-reduce goes: adasum.Adasum(algorithm="vhdd").all_reduce_flat
broken down into its phases, next to a Gloo SUM all-reduce of the same buffer.

The library is not changed: inside each worker process the phase functions of
``adasum._vhdd``, ``adasum._p2p``, ``adasum._reducer`` and the kernels' entry points as
``_vhdd`` calls them are replaced, for the instrumented calls only, by wrappers that read the
wall clock. Each row is the time spent in a phase *excluding* the named phases inside it, so
the rows of one call add up to the call; the last row, "other", is what no phase covers
(dispatch, the plan, buffers, slicing). Every repetition runs three calls interleaved, each
after a barrier: the plain adasum call, the instrumented one and dist.all_reduce(SUM); the
medians are printed for rank 0 and as the maximum of the ranks' medians.

    python benchmarks/profile_collective.py                # 2 and 4 ranks, 2^23 float32
    python benchmarks/profile_collective.py --worlds 3 --exponent 20
    python benchmarks/profile_collective.py --quick        # a smoke run (the test's)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from _args import comma_list
from _timing import timed

import adasum
from adasum import _p2p, _reducer, _vhdd
from adasum.launch import spawn

#: The phases; their names are the table's row prefixes.
PHASES = {
    "fold": "fold",
    "reduce_scatter": "reduce-scatter",
    "all_gather": "all-gather",
    "unfold": "unfold",
}
#: Steps inside a phase; an exchange directly inside the reduce-scatter or the all-gather
#: starts its next level (the all-gather's levels are numbered as the ones they undo).
STEPS = {
    "exchange": "exchange",
    "segment_partials": "partials (float64 a.b, |a|^2, |b|^2)",
    "leaf_reduce": "sum of partials (recursive doubling)",
    "coefficients": "coefficients",
    "segment_combine": "combination",
}
#: The validation, one row each (the messages of the agreement included).
VALIDATION = {"flat_problem": "validation (local)", "_agree": "agreement (one round of small messages)"}
OTHER = "other (dispatch, plan, buffers, slicing)"
#: The medians beside the phases: the instrumented call, the plain call, the SUM all-reduce.
TOTALS = ("call", "plain", "SUM", "phases")


class _Frame:
    """One timed call: its row, whether calls inside it get rows of their own, the time of
    those that did, and the level its next exchange starts (``step`` is 0 for no levels)."""

    __slots__ = ("label", "opaque", "children", "level", "step")

    def __init__(self, label: str, opaque: bool, level: int = 0, step: int = 0) -> None:
        self.label, self.opaque, self.children, self.level, self.step = label, opaque, 0.0, level, step


class Clock:
    """Exclusive wall-clock seconds per label over one call. A wrapped function called inside
    an opaque frame (a step, or the validation) is not timed on its own: its time stays in
    that frame's row, as the exchanges of the recursive doubling stay in its row."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[_Frame] = []

    def timed(self, frame: _Frame, fn: Callable[[], Any]) -> Any:
        self.stack.append(frame)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            elapsed = time.perf_counter() - start
            self.stack.pop()
            self.seconds[frame.label] = self.seconds.get(frame.label, 0.0) + elapsed - frame.children
            if self.stack:
                self.stack[-1].children += elapsed

    def call(self, fn: Callable[[], Any]) -> None:
        """Time ``fn`` afresh as the root frame, whose own time is :data:`OTHER`."""
        self.seconds = {}
        self.timed(_Frame(OTHER, False), fn)

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            parent = self.stack[-1] if self.stack else None
            if parent is None or parent.opaque:
                return fn(*args, **kwargs)
            if name == "reduce_scatter":
                frame = _Frame(PHASES[name], False, 0, 1)
            elif name == "all_gather":  # all_gather(flats, plan, link, history) undoes the levels last first
                frame = _Frame(PHASES[name], False, len(args[3]) + 1, -1)
            elif name in PHASES:
                frame = _Frame(PHASES[name], False)
            elif name in STEPS:
                if name == "exchange":
                    parent.level += parent.step
                prefix = f"{parent.label} L{parent.level}" if parent.step else parent.label
                frame = _Frame(f"{prefix} {STEPS[name]}", True)
            else:
                frame = _Frame(VALIDATION[name], True)
            return self.timed(frame, lambda: fn(*args, **kwargs))

        return wrapper


@contextlib.contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    """The library's phase functions wrapped by ``clock`` while inside; restored after."""
    # _vhdd looks its phases and kernels up in its own namespace at every call.
    targets = [(_vhdd, name) for name in PHASES] + [(_vhdd, name) for name in STEPS if name != "exchange"]
    targets += [(_p2p.Link, "exchange"), (_reducer, "flat_problem"), (_reducer.Reducer, "_agree")]
    with contextlib.ExitStack() as stack:
        for owner, name in targets:
            stack.enter_context(mock.patch.object(owner, name, clock.wrap(getattr(owner, name), name)))
        yield


def _worker(rank: int, world: int, n: int, reps: int) -> dict[str, float]:
    """This rank's medians in ms: every phase row, "phases" (their sum in each repetition),
    "call" (instrumented), "plain" and "SUM"."""
    gen = torch.Generator().manual_seed(rank)
    source = torch.randn(n, generator=gen)
    buf = torch.empty_like(source)
    reset = lambda: buf.copy_(source)  # noqa: E731
    reducer = adasum.Adasum(algorithm="vhdd")
    clock = Clock()
    samples: dict[str, list[float]] = {}
    ada = lambda: reducer.all_reduce_flat(buf, [n])  # noqa: E731
    for rep in range(reps + 2):  # two warm-up repetitions: connections, buffers, caches
        plain = timed(ada, reset)[0]
        with instrumented(clock):
            call = timed(lambda: clock.call(ada), reset)[0]
        total = timed(lambda: dist.all_reduce(buf), reset)[0]
        if rep < 2:
            continue
        # The phases' sum per repetition, not the sum of their medians: a slow phase in one
        # repetition and another in the next would make the medians' sum fall short of the call.
        phases = sum(clock.seconds.values())
        for label, seconds in {**clock.seconds, "phases": phases, "call": call, "plain": plain, "SUM": total}.items():
            samples.setdefault(label, []).append(seconds)
    return {label: statistics.median(s) * 1e3 for label, s in samples.items()}


def table(world: int, n: int, ranks: list[dict[str, float]]) -> list[str]:
    """The markdown table of one world size from every rank's medians."""
    # Ranks run different phases (a folded rank has no reduce-scatter): rows in order of first sight.
    seen = dict.fromkeys(label for r in ranks for label in r if label not in TOTALS and label != OTHER)
    phases = [*seen, OTHER]
    call, total = ranks[0]["call"], ranks[0]["SUM"]
    rows = [(label, label) for label in phases] + [
        ("**sum of the phases, median over repetitions**", "phases"),
        ("**call, instrumented**", "call"),
        ("**call, plain**", "plain"),
        ("**dist.all_reduce SUM**", "SUM"),
    ]
    lines = [
        f"\n{world} ranks, 2^{n.bit_length() - 1} float32: medians in ms",
        "| phase | rank 0 ms | % of call | max over ranks ms | / SUM |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, key in rows:
        ms, worst = ranks[0].get(key, 0.0), max(r.get(key, 0.0) for r in ranks)
        lines.append(f"| {name} | {ms:.2f} | {100 * ms / call:.1f}% | {worst:.2f} | {ms / total:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=comma_list(int), default="2,4", metavar="N,...",
                        help="world sizes (default %(default)s)")
    parser.add_argument("--exponent", type=int, default=23, help="the buffer holds 2^EXPONENT float32")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="2 and 3 ranks, 2^18 float32, 5 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.worlds, args.exponent, args.reps = [2, 3], 18, 5
    n = 1 << args.exponent
    print(f"torch {torch.__version__}, Gloo on CPU; medians of {args.reps} interleaved repetitions")
    for world in args.worlds:
        ranks = spawn(_worker, world, n, args.reps, timeout=1800)
        print("\n".join(table(world, n, ranks)), flush=True)


if __name__ == "__main__":
    main()
