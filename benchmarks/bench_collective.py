"""adasum.all_reduce against dist.all_reduce(SUM), and the pairwise kernel against torch.add.

Every comparison runs both sides interleaved in one process group on the same buffers and
prints medians and their ratio, so the machine's noise hits both alike. The collectives are
timed as ``_timing.interleaved`` does: per repetition the slowest rank's wall-clock time and the
CPU time of all ranks together (the work, which a loaded machine's waiting leaves out).

    python benchmarks/bench_collective.py            # the README's table
    python benchmarks/bench_collective.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from _args import comma_list
from _timing import interleaved, median_ms, ratio_cells

import adasum
from adasum.launch import spawn


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of ResNet-50 (161 tensors, 25.6M parameters), from its architecture."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, channels, 1, 1), (4 * width,), (4 * width,)]
            channels = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _collective_worker(rank: int, world: int, sizes: list[int], reps: int) -> list[tuple]:
    rows = []
    gen = torch.Generator().manual_seed(rank)
    cases = [(f"2^{n.bit_length() - 1} float32", [n]) for n in sizes]
    cases.append(("ResNet-50-shaped, 161 layers", [int(torch.Size(s).numel()) for s in resnet50_shapes()]))
    reducer = adasum.Adasum()  # kept across calls, as a training loop keeps it: buffers are reused
    for name, numels in cases:
        source = torch.randn(sum(numels), generator=gen)
        buf = torch.empty_like(source)
        reset = lambda: buf.copy_(source)  # noqa: E731
        ada = lambda: reducer.all_reduce_flat(buf, numels)  # noqa: E731
        ref = lambda: dist.all_reduce(buf)  # noqa: E731
        wall, cpu = interleaved([ada, ref], reps, reset)
        rows.append((world, name, wall, cpu))
    return rows


def _kernel_rows(n: int, reps: int, calls: int = 5) -> list[tuple]:
    """adasum.combine against torch.add on the same two tensors, both writing to one
    preallocated tensor (no page faults timed); each sample times ``calls`` calls in a row."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        out = torch.empty_like(a)
        t_ada, t_add = [], []
        for _ in range(reps + 1):
            start = time.perf_counter()
            for _ in range(calls):
                adasum.combine(a, b, out=out)
            t_ada.append((time.perf_counter() - start) / calls)
            start = time.perf_counter()
            for _ in range(calls):
                torch.add(a, b, out=out)
            t_add.append((time.perf_counter() - start) / calls)
        name = f"2^{n.bit_length() - 1} {str(dtype).removeprefix('torch.')}"
        rows.append((name, _median_ms(t_ada[1:]), _median_ms(t_add[1:])))
    return rows


def _reduce_row(ranks: int, reps: int) -> tuple[str, float]:
    """adasum.reduce of ``ranks`` ranks of a 10M-parameter model (the simulator's engine)."""
    gen = torch.Generator().manual_seed(0)
    shapes = resnet50_shapes()[:130]
    per_rank = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(ranks)]
    params = sum(t.numel() for t in per_rank[0])
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        adasum.reduce(per_rank)
        samples.append(time.perf_counter() - start)
    return f"adasum.reduce, {ranks} ranks x {params / 1e6:.1f}M parameters in {len(shapes)} layers", statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=comma_list(int), default="2,3,4", metavar="N,...",
                        help="world sizes (default %(default)s)")
    parser.add_argument("--exponents", type=comma_list(int), default="16,20,23", metavar="E,...",
                        help="buffers of 2^E float32 (default %(default)s)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.worlds, args.exponents, args.reps = [2, 3], [12, 16], 3
    sizes = [1 << e for e in args.exponents]

    print(f"torch {torch.__version__}, Gloo on CPU, {torch.get_num_threads()} threads; medians of {args.reps} "
          "interleaved repetitions, each the slowest rank's wall-clock time and all ranks' CPU time\n")
    print("| ranks | buffer | adasum.all_reduce ms | dist.all_reduce SUM ms | ratio | ratio, range "
          "| CPU ms, all ranks, adasum / SUM | CPU ratio | CPU ratio, range |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for world in args.worlds:
        rows = spawn(_collective_worker, world, sizes, args.reps, timeout=1800)[0]
        for w, name, wall, cpu in rows:
            if args.quick and name.startswith("ResNet"):
                continue
            print(f"| {w} | {name} | {median_ms(wall, 0):.2f} | {median_ms(wall, 1):.2f} | "
                  f"{' | '.join(ratio_cells(wall, 0, 1))} | {median_ms(cpu, 0):.1f} / {median_ms(cpu, 1):.1f} | "
                  f"{' | '.join(ratio_cells(cpu, 0, 1))} |", flush=True)

    print("\n| pairwise kernel | adasum.combine ms | torch.add ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, t_ada, t_add in _kernel_rows(1 << max(args.exponents), args.reps):
        print(f"| {name} | {t_ada:.2f} | {t_add:.2f} | {t_ada / t_add:.2f}x |")
    if not args.quick:
        name, seconds = _reduce_row(64, 3)
        print(f"\n{name}: {seconds:.2f} s (median of 3)")


if __name__ == "__main__":
    main()
