"""adasum.horovod's Adasum against the engine it calls, on the same tensors in one run.

Four pairs, each run interleaved (one call of each side per repetition, a barrier before
every call) in one process group, so the machine's noise hits both sides alike:

* ``hvd.allreduce(t, op=Adasum)`` (out of place) against ``adasum.all_reduce`` of a copy
  of ``t`` (the copy is what an out-of-place call must do, so both sides pay it);
* ``hvd.allreduce_(t, op=Adasum)`` (in place) against ``adasum.all_reduce([t])``;
* ``hvd.grouped_allreduce_`` of 8 tensors against ``adasum.all_reduce`` of the same 8;
* ``hvd.DistributedOptimizer(SGD, op=Adasum).step()`` against the same delta-mode step written
  by hand: keep x, a local ``SGD.step()``, the deltas x' - x through ``adasum.all_reduce``,
  x + Adasum(deltas) written back.

``adasum.all_reduce`` here is one kept :class:`adasum.Adasum`'s ``all_reduce`` (what the
function calls, minus making a reducer each time), as a training loop keeps one: the stricter
reference. A repetition's time is the slowest rank's; the ratio is adasum.horovod's time over
the engine's in the same repetition, reported as the median and the range over repetitions.
Beside it, the CPU time the call cost all ranks together (each process's, all its threads):
on a shared, loaded machine the wall-clock time mostly measures the other programs' share of
the cores, which CPU time leaves out. Each rank runs one thread.

    python benchmarks/bench_horovod.py            # docs/horovod.md's table
    python benchmarks/bench_horovod.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _args import comma_list
from _timing import interleaved, median_ms, ratios

import adasum
import adasum.horovod as hvd
from adasum.launch import spawn

PARTS = 8  # tensors in the grouped call and the optimizer's model
SMALL = 1 << 20  # bytes: buffers up to this size get 4x the repetitions


def _split(numel: int) -> list[int]:
    """``numel`` elements as PARTS tensors of unequal sizes (layers differ in size)."""
    weights = list(range(1, PARTS + 1))
    sizes = [max(1, numel * w // sum(weights)) for w in weights]
    sizes[-1] += numel - sum(sizes)
    return sizes


def _pairs(rank: int, numel: int) -> dict[str, tuple[Callable, Callable, Callable]]:
    """Per case: (adasum.horovod's call, the engine's call, the reset before either)."""
    gen = torch.Generator().manual_seed(rank)
    source = torch.randn(numel, generator=gen)
    buf = torch.empty_like(source)
    reducer = adasum.Adasum()
    parts = [torch.randn(n, generator=gen) for n in _split(numel)]
    bufs = [torch.empty_like(p) for p in parts]

    def reset_parts() -> None:
        for b, p in zip(bufs, parts):
            b.copy_(p)

    # The optimizer: PARTS parameters, fixed per-rank gradients, plain SGD (delta = -lr * g).
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in _split(numel)]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    wrapped = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1), op=hvd.Adasum)
    local = torch.optim.SGD(params, lr=0.1)

    def reset_params() -> None:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)

    old = [torch.empty_like(p) for p in params]
    data = [p.detach() for p in params]

    def by_hand() -> None:
        # As lean as delta mode can be written: kept copies, the deltas formed and reduced
        # in the parameters themselves, no allocation.
        torch._foreach_copy_(old, data)
        local.step()
        torch._foreach_sub_(data, old)
        reducer.all_reduce(data)
        torch._foreach_add_(data, old)

    return {
        "allreduce": (lambda: hvd.allreduce(buf, op=hvd.Adasum), lambda: reducer.all_reduce([buf.clone()]),
                      lambda: buf.copy_(source)),
        "allreduce_": (lambda: hvd.allreduce_(buf, op=hvd.Adasum), lambda: reducer.all_reduce([buf]),
                       lambda: buf.copy_(source)),
        "grouped_allreduce_": (lambda: hvd.grouped_allreduce_(bufs, op=hvd.Adasum),
                               lambda: reducer.all_reduce(bufs), reset_parts),
        "DistributedOptimizer.step": (wrapped.step, by_hand, reset_params),
    }


def _worker(rank: int, world: int, sizes: list[int], reps: int) -> list[tuple]:
    hvd.init()  # adopts the process group spawn made
    torch.set_num_threads(1)  # the ranks share the machine's cores
    rows = []
    for numel in sizes:
        n = reps * (4 if numel * 4 <= SMALL else 1)  # small calls are cheap and noisier
        for case, (ours, engine, reset) in _pairs(rank, numel).items():
            wall, cpu = interleaved([ours, engine], n, reset)
            rows.append((world, numel * 4, case, wall, cpu))
    return rows


def _bytes(n: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=comma_list(int), default="2,4", metavar="N,...",
                        help="world sizes (default %(default)s)")
    parser.add_argument("--kib", type=comma_list(int), default="1,64,1024,16384,65536", metavar="KIB,...",
                        help="float32 buffer sizes in KiB (default %(default)s)")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.worlds, args.kib, args.reps = [2], [1, 64], 3
    sizes = [k * 1024 // 4 for k in args.kib]

    print(f"torch {torch.__version__}, Gloo on CPU, 1 thread per rank; {args.reps} interleaved repetitions "
          f"({4 * args.reps} up to {_bytes(SMALL)}), each the slowest rank's time\n")
    print("| ranks | float32 | call | adasum.horovod ms | adasum.all_reduce ms | ratio, median | ratio, range "
          "| CPU ms, adasum.horovod / engine | CPU ratio, median |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for world in args.worlds:
        for w, nbytes, case, wall, cpu in spawn(_worker, world, sizes, args.reps, timeout=3600)[0]:
            med = [median_ms(wall, k) for k in (0, 1)]
            wall_ratios = ratios(wall, 0, 1)
            cpu_med = [median_ms(cpu, k) for k in (0, 1)]
            cpu_ratio = statistics.median(ratios(cpu, 0, 1))
            print(f"| {w} | {_bytes(nbytes)} | {case} | {med[0]:.3f} | {med[1]:.3f} | "
                  f"{statistics.median(wall_ratios):.3f}x | {min(wall_ratios):.2f}-{max(wall_ratios):.2f}x | "
                  f"{cpu_med[0]:.2f} / {cpu_med[1]:.2f} | {cpu_ratio:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
