"""Real Horovod's Adasum (MPI) against adasum.all_reduce and SUM all-reduces (Gloo's, MPI's), on
the same tensors in the same minutes.

    PYTHONPATH=src python benchmarks/bench_reference.py --horovod-python /work/hvd/venv/bin/python
    PYTHONPATH=src python benchmarks/bench_reference.py --quick ...   # a smoke run

Horovod 0.28.1 built for CPU with MPI (``../shared/anchors/install_horovod.sh``) is the
reference implementation of Adasum. For every run and world size this script starts one
``mpirun`` job of the Horovod Python; its ranks call ``hvd.init()`` (MPI) and also join a Gloo
process group of the same ranks (torch.distributed, rank and size from Open MPI's environment,
the address from this script), then time four sides on the same per-rank tensors, interleaved
as ``_timing.interleaved`` does (a barrier before every call, the order rotating):

* ``hvd.allreduce(t, op=hvd.Adasum)``: out of place (Horovod copies ``t`` into its output and
  reduces that; ``t`` is not changed);
* ``adasum.all_reduce`` of a copy of ``t`` (a kept :class:`adasum.Adasum`, as a training loop
  keeps one; the copy makes it out of place too);
* ``dist.all_reduce`` (Gloo, SUM) of a copy of ``t``: the all-reduce adasum's speed targets
  are set against, over the same transport (TCP);
* ``hvd.allreduce(t, op=hvd.Sum)``: the same over Horovod's MPI, which moves data between the
  ranks of one machine through shared memory; beside the Gloo SUM it separates the transport
  from the algorithm in the first ratio.

Each rank runs one thread; the adasum import is this checkout's (``src`` on PYTHONPATH). A
repetition's wall-clock time is the slowest rank's, its CPU time the sum over the ranks (every
thread of each process: Horovod's background thread, which polls, and Gloo's). Per run the
table gives medians over the repetitions and the ratios' medians; the summary gives, per cell,
the median and the range of the runs' medians. After the timing one more call of each Adasum
checks that both give the same float32 bits (the count of elements that differ is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _args import comma_list

ROOT = Path(__file__).resolve().parent.parent
#: The columns, as the worker records them.
SIDES = ("Horovod", "adasum", "Gloo SUM", "MPI SUM")
#: (label, side, base): the ratios the tables show.
RATIOS = [("ours / Horovod", 1, 0), ("ours / Gloo SUM", 1, 2), ("Horovod / MPI SUM", 0, 3),
          ("Gloo SUM / MPI SUM", 2, 3)]


def worker(args: argparse.Namespace) -> None:
    """One rank of the mpirun job: time the three sides, rank 0 writes the results."""
    import horovod.torch as hvd  # only the Horovod Python has it
    import torch
    import torch.distributed as dist
    from _timing import interleaved

    import adasum

    hvd.init()
    torch.set_num_threads(1)  # the ranks share the machine's cores
    rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    assert (rank, world) == (hvd.rank(), hvd.size())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world)
    reducer = adasum.Adasum()
    rows = []
    for e in args.exponents:
        t = torch.randn(1 << e, generator=torch.Generator().manual_seed(1000 * e + rank))
        sides = [lambda: hvd.allreduce(t, op=hvd.Adasum), lambda: reducer.all_reduce([t.clone()]),
                 lambda: dist.all_reduce(t.clone()), lambda: hvd.allreduce(t, op=hvd.Sum)]
        wall, cpu = interleaved(sides, args.reps)
        theirs, ours = hvd.allreduce(t, op=hvd.Adasum), t.clone()
        reducer.all_reduce([ours])
        differing = torch.tensor((theirs != ours).sum().item(), dtype=torch.float64)
        dist.all_reduce(differing, op=dist.ReduceOp.MAX)
        rows.append({"world": world, "exponent": e, "wall": wall, "cpu": cpu, "differing": int(differing.item())})
    dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))


def _launch(args: argparse.Namespace, world: int, out: str) -> list[dict]:
    from adasum.launch import free_port

    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    command = ["mpirun", "--oversubscribe", "-np", str(world), "-bind-to", "none", "-x", "PYTHONPATH",
               "-x", "OMP_NUM_THREADS", args.horovod_python, __file__, "worker", "--port", str(free_port()),
               "--exponents", ",".join(map(str, args.exponents)), "--reps", str(args.reps), "--out", out]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def _cells(row: dict) -> dict[str, float]:
    """One run's medians of one cell: ms per side, and every ratio of wall and CPU time."""
    cells = {}
    for kind in ("wall", "cpu"):
        samples = row[kind]
        for k, side in enumerate(SIDES):
            cells[f"{kind} {side}"] = statistics.median(s[k] for s in samples) * 1e3
        for label, side, base in RATIOS:
            cells[f"{kind} {label}"] = statistics.median(s[side] / s[base] for s in samples if s[base] > 0)
    return cells


def _table(title: str, cells: dict[tuple[int, int], list[dict[str, float]]], differing: dict) -> None:
    """Per (world, size): the median of the runs' values, and with more than one run their range."""
    def cell(values: list[float], fmt: str) -> str:
        med = format(statistics.median(values), fmt)
        return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    print(f"\n{title}")
    ratios = [label for label, _, _ in RATIOS]
    print("| ranks | float32 | " + " | ".join(f"{side} ms" for side in SIDES) + " | "
          + " | ".join(f"{r}, wall" for r in ratios) + f" | CPU ms, all ranks, {' / '.join(SIDES)} | "
          + " | ".join(f"{r}, CPU" for r in ratios) + " | elements differing |")
    print("|---:|---:|" + "---:|" * (len(SIDES) + 2 * len(ratios) + 2))
    for (world, e), runs in cells.items():
        column = lambda key: [c[key] for c in runs]  # noqa: E731
        wall = [cell(column(f"wall {side}"), ".1f") for side in SIDES]
        cpu = " / ".join(format(statistics.median(column(f"cpu {side}")), ".0f") for side in SIDES)
        print(f"| {world} | 2^{e} | {' | '.join(wall)} | "
              + " | ".join(cell(column(f"wall {r}"), ".2f") + "x" for r in ratios) + f" | {cpu} | "
              + " | ".join(cell(column(f"cpu {r}"), ".2f") + "x" for r in ratios)
              + f" | {', '.join(map(str, differing[world, e]))} |", flush=True)


def compare(args: argparse.Namespace) -> None:
    if args.quick:
        args.worlds, args.exponents, args.reps, args.runs = [2], [12, 16], 3, 1
    print(f"Horovod's Adasum ({args.horovod_python}, MPI) against adasum.all_reduce, Gloo SUM and MPI SUM, "
          f"1 thread per rank; {args.runs} runs x {args.reps} interleaved repetitions per world size")
    cells: dict[tuple[int, int], list[dict[str, float]]] = {}
    differing: dict[tuple[int, int], list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for world in args.worlds:
                for row in _launch(args, world, f"{tmp}/{run}-{world}.json"):
                    key = (row["world"], row["exponent"])
                    cells.setdefault(key, []).append(_cells(row))
                    differing.setdefault(key, []).append(row["differing"])
            print(f"run {run + 1} of {args.runs} done", file=sys.stderr, flush=True)
    _table("Medians of the runs (in brackets the range of the runs' medians); ratios are per repetition, "
           "then the median over repetitions", cells, differing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["compare", "worker"], default="compare")
    parser.add_argument("--horovod-python", default="/work/hvd/venv/bin/python",
                        help="a Python with Horovod built with MPI (default %(default)s)")
    parser.add_argument("--worlds", type=comma_list(int), default="2,4", metavar="N,...",
                        help="world sizes, powers of two (default %(default)s)")
    parser.add_argument("--exponents", type=comma_list(int), default="20,23", metavar="E,...",
                        help="tensors of 2^E float32 (default %(default)s)")
    parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions per run (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="mpirun jobs per world size (default %(default)s)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one mpirun job may take")
    parser.add_argument("--quick", action="store_true", help="2 ranks, small tensors, 1 run of 3 repetitions")
    parser.add_argument("--port", type=int, help="worker: the Gloo group's port on 127.0.0.1")
    parser.add_argument("--out", help="worker: where rank 0 writes its results")
    args = parser.parse_args(argv)
    if bad := [w for w in args.worlds if w & (w - 1)]:
        parser.error(f"--worlds {bad[0]}: Horovod's Adasum needs a power of two ranks")
    (worker if args.mode == "worker" else compare)(args)


if __name__ == "__main__":
    main()
