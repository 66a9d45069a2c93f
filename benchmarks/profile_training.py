"""Where a training step's time goes: Adasum's DDP hook and delta-mode optimizer, phase by phase,
next to the DDP setups they are measured against by ``bench_training.py``.

    python benchmarks/profile_training.py [--ranks 4] [--rounds 7] [--steps 5] [--quick]

The setups, model and batches are ``bench_training.py``'s (imported, not copied). Each worker
process wraps library functions with timers (the library itself has no timing code) and times
every phase of every step:

- forward, backward and the optimizer step, as the training loop calls them;
- the backward pass split at its last gradient (a post-accumulate-grad hook on every parameter
  notes when autograd wrote the last one): what comes after is DDP waiting for the bucket
  reductions to finish (DDP's own all-reduce, or the hook's background thread) and copying the
  results into ``.grad``;
- on the hook's background thread (concurrent with the backward pass, so outside the sum):
  per bucket, the validation (``all_reduce_flat`` less the algorithm) and the reduction
  (``Adasum._reduce``);
- for delta mode, inside ``DistributedOptimizer.step``: the check (with the step's one agreement
  among the ranks), the snapshot, the local step, the reduction (the algorithm and the packing
  around it) and the apply;
- for delta mode with ``overlap=True``: each bucket's step (snapshot, inner Adam, new - old) in
  the hooks during backward or in ``step()``, the wait for the reductions in ``step()``, and on
  the background thread each bucket's reduction and apply.

Setups run interleaved as in ``bench_training.py``; the table gives rank 0's mean milliseconds
per step over all timed steps (means, so that the phases add up to the step; ``other`` is what no
timer covers) and, for comparison with the benchmark, the median step. Beside each phase's
wall-clock time is the CPU time of the thread that ran it (``time.thread_time``): where the CPU
time is much smaller, the phase waited (for a partner rank, for Gloo's threads, or for a core
on a loaded machine) rather than computed. The title line adds rank 0's whole CPU time per step
(all threads: autograd's, the background thread's and Gloo's), the work the step cost.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from bench_training import SETUPS, batch, make_model

import adasum.optim._distributed as distributed
import adasum.optim._overlap as overlap
from adasum._adasum import Adasum
from adasum._reducer import Reducer
from adasum.ddp import AdasumState
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer

#: (Adasum setup, its baseline), as bench_training.py pairs them.
PAIRS = [("ddp-adasum", "ddp-mean"), ("delta-adam", "ddp-adam"), ("delta-adam-overlap", "ddp-adam")]
#: Top-level phases of a step, in the order they run.
STEP = ["zero_grad", "forward", "backward", "optimizer step"]
#: Rows that run on the hook's background thread, concurrently with the backward pass.
BACKGROUND = "bucket reductions (background thread)"
OTHER = "other"
#: The prefix of a phase's key in the clock's totals that holds its thread's CPU time.
CPU = "cpu:"
#: rank 0's CPU time of a whole step (every thread of the process).
PROCESS_CPU = "process CPU"


class Clock:
    """Seconds per phase, keyed by the path of enclosing phases on the calling thread (so a
    validation inside ``check`` and one inside ``all_reduce`` are told apart)."""

    def __init__(self) -> None:
        #: Wall-clock seconds per path, and under ``cpu:<path>`` the CPU seconds of the thread that ran it.
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._local = threading.local()

    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def add(self, name: str, seconds: float, cpu: float | None = None) -> None:
        key = "/".join([*self._stack(), name])
        self.totals[key] += seconds
        self.counts[key] += 1
        if cpu is not None:
            self.totals[CPU + key] += cpu

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            t0, c0 = time.perf_counter(), time.thread_time()
            stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                self.add(name, time.perf_counter() - t0, time.thread_time() - c0)

        return wrapper

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def take(self) -> dict[str, float]:
        """The totals so far, and a fresh start."""
        totals = dict(self.totals)
        self.totals.clear()
        return totals


class _Phase:
    def __init__(self, clock: Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> _Phase:
        self.t0, self.c0 = time.perf_counter(), time.thread_time()
        self.clock._stack().append(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.clock._stack().pop()
        # Kept, so that a split of this phase is cut from the same two instants as its total.
        self.t1, self.c1 = time.perf_counter(), time.thread_time()
        self.clock.add(self.name, self.t1 - self.t0, self.c1 - self.c0)


def _instrument(clock: Clock) -> None:
    """Wrap, in this worker process only, the library functions whose time the table splits."""
    # The hook's background thread: one call per bucket.
    AdasumState._reduce = clock.timed(BACKGROUND, AdasumState._reduce)
    Reducer.all_reduce_flat = clock.timed("all_reduce_flat", Reducer.all_reduce_flat)
    # Delta mode's step, in the order DistributedOptimizer.step calls them.
    Reducer.check = clock.timed("check", Reducer.check)
    DistributedOptimizer._snapshot = clock.timed("snapshot", DistributedOptimizer._snapshot)
    # step() calls these through the module's globals, so they are replaced there.
    distributed.local_delta = clock.timed("local step (inner Adam, then new - old)", distributed.local_delta)
    distributed.apply_delta = clock.timed("apply (old + reduced delta)", distributed.apply_delta)
    # The reduction after the check (which hands it its agreement, so it has no round of its own).
    Reducer.all_reduce = clock.timed("all_reduce", Reducer.all_reduce)
    # The part of the validation that exchanges messages (every rank waits for the slowest).
    Reducer._agree = clock.timed("agreement among the ranks", Reducer._agree)
    Adasum._reduce = clock.timed("algorithm (Adasum._reduce)", Adasum._reduce)
    # overlap=True: the bucket steps, the wait in step(), and the background thread's jobs (the
    # module function its jobs call, replaced where they look it up).
    overlap.Overlap._step = clock.timed("bucket step (snapshot, inner Adam, new - old)", overlap.Overlap._step)
    overlap.Overlap._wait = clock.timed("waiting for the reductions", overlap.Overlap._wait)
    overlap._reduce = clock.timed(BACKGROUND, overlap._reduce)


def _worker(rank: int, world: int, rounds: int, steps: int) -> tuple[dict, dict, dict]:
    clock = Clock()
    _instrument(clock)
    x, y = batch(rank)
    # FSDP2 is left out: it met its target (bench_training.py).
    setups = {name: SETUPS[name]() for name in ("ddp-mean", "ddp-adasum", "ddp-adam", "delta-adam", "delta-adam-overlap")}
    last_grad = [0.0, 0.0]  # wall-clock and thread CPU time when autograd wrote the last gradient

    def note(_: torch.Tensor) -> None:
        # On CPU, autograd runs the backward pass on the thread that called backward().
        last_grad[:] = time.perf_counter(), time.thread_time()

    for model, _ in setups.values():
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(note)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        with clock.phase("step"):
            with clock.phase("zero_grad"):
                opt.zero_grad(set_to_none=True)
            with clock.phase("forward"):
                loss = torch.nn.functional.mse_loss(model(x), y)
            with clock.phase("backward") as backward:
                loss.backward()
            clock.add("backward/until the last gradient", last_grad[0] - backward.t0, last_grad[1] - backward.c0)
            clock.add("backward/after the last gradient (waiting for the reductions)", backward.t1 - last_grad[0],
                      backward.c1 - last_grad[1])
            with clock.phase("optimizer step"):
                opt.step()

    for model, opt in setups.values():  # warm-up: DDP rebuilds its buckets after iteration 1
        for _ in range(2):
            step(model, opt)
    clock.take()
    totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in setups}
    per_step: dict[str, list[float]] = {name: [] for name in setups}
    process_cpu: dict[str, list[float]] = {name: [] for name in setups}
    buckets: dict[str, int] = {}
    for _ in range(rounds):
        for name, (model, opt) in setups.items():
            dist.barrier()
            for _ in range(steps):
                before, cpu0 = clock.counts.get(BACKGROUND, 0), time.process_time()
                step(model, opt)
                process_cpu[name].append(time.process_time() - cpu0)
                buckets[name] = clock.counts.get(BACKGROUND, 0) - before
                taken = clock.take()
                per_step[name].append(taken["step"])
                for key, seconds in taken.items():
                    totals[name][key] += seconds
            dist.barrier()
    n = rounds * steps
    means = {name: {k: v / n for k, v in t.items()} for name, t in totals.items()}
    medians = {name: statistics.median(v) for name, v in per_step.items()}
    medians.update({f"{PROCESS_CPU} {name}": statistics.median(v) for name, v in process_cpu.items()})
    return means, medians, buckets


def rows(means: dict[str, float]) -> list[tuple[str, float]]:
    """(path, seconds) in table order: each phase, its sub-phases under it, and under a phase
    with sub-phases the ``other`` time none of them covers. The background thread last."""
    out: list[tuple[str, float]] = []

    def walk(path: str) -> None:
        out.append((path, means.get(path, 0.0)))
        children = [k for k in means if k.startswith(path + "/") and "/" not in k[len(path) + 1 :]]
        for child in children:
            walk(child)
        if children and path != "step/backward":  # backward's two halves cover it exactly
            out.append((f"{path}/{OTHER}", means.get(path, 0.0) - sum(means[c] for c in children)))

    walk("step")
    background = [k for k in means if k == BACKGROUND or k.startswith(BACKGROUND + "/")]
    if background:
        walk(BACKGROUND)
    return out


def _label(path: str) -> str:
    parts = path.split("/")
    return "  " * (len(parts) - 1) + parts[-1]


def table(name: str, base: str, means: dict[str, dict[str, float]], medians: dict[str, float],
          buckets: dict[str, int]) -> str:
    """Markdown table of one setup against its baseline, and the line that sums it up."""
    ours, theirs = dict(rows(means[name])), dict(rows(means[base]))
    cpu_ours, cpu_theirs = (dict(rows({k.removeprefix(CPU): v for k, v in means[s].items() if k.startswith(CPU)}))
                            for s in (name, base))
    order = [k for k, _ in rows({**means[base], **means[name]}) if k in ours or k in theirs]
    step_a, step_b = theirs["step"], ours["step"]
    cpu_a, cpu_b = medians[f"{PROCESS_CPU} {base}"], medians[f"{PROCESS_CPU} {name}"]
    lines = [
        f"{name} against {base} (rank 0, ms per step; mean over the timed steps; median step "
        f"{1e3 * medians[base]:.1f} vs {1e3 * medians[name]:.1f}, {medians[name] / medians[base]:.2f}x; "
        f"median CPU time of the process per step {1e3 * cpu_a:.1f} vs {1e3 * cpu_b:.1f}, {cpu_b / cpu_a:.2f}x)",
        f"| phase | {base} ms | % | thread CPU ms | {name} ms | % | thread CPU ms | extra ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(value: float | None, whole: float, cpu: float | None) -> str:
        if value is None:
            return " |  | "
        return f"{1e3 * value:.1f} | {100 * value / whole:.0f} | " + ("" if cpu is None else f"{1e3 * cpu:.1f}")

    for key in order:
        a, b = theirs.get(key), ours.get(key)
        extra = "" if a is None or b is None else f"{1e3 * (b - a):+.1f}"
        lines.append(f"| {_label(key)} | {cell(a, step_a, cpu_theirs.get(key))} | "
                     f"{cell(b, step_b, cpu_ours.get(key))} | {extra} |")
    if buckets.get(name):
        lines.append(f"({buckets[name]} buckets per step reduced on the background thread)")
    lines.append(verdict(name, ours, theirs))
    return "\n".join(lines)


def verdict(name: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    """One line: the step's extra time per top-level phase, largest first, each with what inside
    it changed (a sub-phase both have: its difference; one only the Adasum setup has: its time)."""
    def ms(seconds: float, sign: str = "") -> str:
        return f"{1e3 * seconds:{sign}.1f}"

    parts = []
    for phase in sorted(STEP, key=lambda p: -abs(ours.get(f"step/{p}", 0.0) - theirs.get(f"step/{p}", 0.0))):
        key = f"step/{phase}"
        diff = ours.get(key, 0.0) - theirs.get(key, 0.0)
        if abs(diff) < 1e-3:
            continue
        inside = [
            f"{k.split('/')[-1]} {ms(v - theirs[k], '+') if k in theirs else ms(v)}"
            for k, v in ours.items()
            if k.startswith(key + "/") and k.count("/") == 2 and not k.endswith(OTHER) and abs(v) >= 1e-3
        ]
        parts.append(f"{phase} {ms(diff, '+')}" + (f" ({', '.join(inside)})" if inside else ""))
    if BACKGROUND in ours:
        algorithm = sum(v for k, v in ours.items() if k.startswith(BACKGROUND) and k.endswith("(Adasum._reduce)"))
        parts.append(f"background thread {ms(ours[BACKGROUND])} per step, {ms(ours[BACKGROUND] - algorithm)} "
                     "of it outside the algorithm")
    return f"=> {name}: {ms(ours['step'] - theirs['step'], '+')} ms per step: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 ranks, 1 round of 2 steps (a smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.ranks, args.rounds, args.steps = 2, 1, 2
    params = sum(p.numel() for p in make_model().parameters())
    means, medians, buckets = spawn(_worker, args.ranks, args.rounds, args.steps, timeout=900)[0]
    print(f"{args.ranks} ranks (Gloo, CPU), {params / 1e6:.1f}M parameters, "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    for name, base in PAIRS:
        print()
        print(table(name, base, means, medians, buckets))


if __name__ == "__main__":
    main()
