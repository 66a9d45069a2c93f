"""One MNIST-style training script under real Horovod (mpirun) and under adasum.horovod
(torchrun), same seed and data, compared: final parameters and time per step.

The training follows Horovod's ``examples/pytorch/pytorch_mnist.py`` in what it asks of
Horovod (``hvd.init``, ``broadcast_parameters``, ``broadcast_optimizer_state``,
``DistributedOptimizer(op=hvd.Adasum or hvd.Average)``, ``torch.set_num_threads(1)``, SGD with
momentum 0.5 at learning rate 0.01, the same small CNN) on generated data instead of MNIST
(nothing can be downloaded here): 28x28 inputs whose labels come from a fixed random linear
teacher, each rank taking every size-th example. The network has no dropout, so nothing random
happens after the seed and both runs see bit-identical inputs.

    python scripts/horovod_side_by_side.py --horovod-python /work/hvd-venv/venv/bin/python
    # one run by hand:
    mpirun -np 2 $HVD_PYTHON scripts/horovod_side_by_side.py worker --impl horovod --op Adasum --out a.pt
    torchrun --standalone --nproc-per-node=2 scripts/horovod_side_by_side.py worker --impl adasum --op Adasum --out b.pt

What it prints per world size and op: the relative difference ||x_hvd - x_ours|| / ||x_hvd||
of all parameters after the first step and after the last, the share of elements that differ
after the first step, the same difference between this op and the other one (what a real
change of algorithm looks like, for scale), the final losses, and the median time per step
(the slowest rank's, steps after the first 5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The checkout's command-line tools share one list syntax (benchmarks/_args.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _args import comma_list  # noqa: E402

WARMUP = 5


class Net(nn.Module):
    """Two 5x5 convolutions (10 and 20 channels) with max-pooling, then 320 -> 50 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def _data(examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the labels of a fixed random linear teacher (argmax over 10 classes)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(examples, 1, 28, 28, generator=gen)
    teacher = torch.randn(28 * 28, 10, generator=gen)
    return images, (images.flatten(1) @ teacher).argmax(1)


def worker(args: argparse.Namespace) -> None:
    """One rank of the training; rank 0 writes the parameters and timings to ``args.out``."""
    if args.impl == "horovod":
        import horovod.torch as hvd
    else:
        import adasum.horovod as hvd
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    images, labels = _data(args.steps * args.batch_size * hvd.size(), args.seed)
    mine = slice(hvd.rank(), None, hvd.size())
    images, labels = images[mine], labels[mine]

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         op=hvd.Adasum if args.op == "Adasum" else hvd.Average)
    snapshots, times, losses = [], [], []
    for step in range(args.steps):
        batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.nll_loss(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step == 0:
            snapshots.append([p.detach().clone() for p in model.parameters()])
    snapshots.append([p.detach().clone() for p in model.parameters()])
    slowest = hvd.allreduce(torch.tensor(times, dtype=torch.float64), op=hvd.Max, name="step_times")
    mean_loss = hvd.allreduce(torch.tensor(losses[-1]), op=hvd.Average, name="last_loss")
    if hvd.rank() == 0:
        torch.save({"first": snapshots[0], "last": snapshots[1], "times": slowest.tolist(),
                    "loss": mean_loss.item(), "size": hvd.size()}, args.out)


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.flatten() for p in params]).double()


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = _flat(a), _flat(b)
    return ((x - y).norm() / y.norm()).item()


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def compare(args: argparse.Namespace) -> None:
    """Run every (world size, op) under both implementations and print the table."""
    script = str(Path(__file__).resolve())
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--seed", str(args.seed)]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    results: dict[tuple[int, str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            for op in ("Adasum", "Average"):
                for impl in ("horovod", "adasum"):
                    out = f"{tmp}/{impl}-{op}-{world}.pt"
                    tail = ["worker", "--impl", impl, "--op", op, "--out", out, *common]
                    if impl == "horovod":
                        _run(["mpirun", "--oversubscribe", "-np", str(world), "-bind-to", "none",
                              args.horovod_python, script, *tail], env)
                    else:
                        _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={world}", script, *tail], env)
                    results[world, op, impl] = torch.load(out)
                    print(f"ran {impl} {op} on {world} ranks", file=sys.stderr, flush=True)

    print(f"{args.steps} steps of SGD (lr {args.lr}, momentum 0.5), batch {args.batch_size} per rank, "
          f"seed {args.seed}; torch {torch.__version__}, CPU, 1 thread per rank\n")
    print("| ranks | op | rel. diff after step 1 | elements differing after step 1 | rel. diff after last step "
          "| for scale: Adasum vs Average, ours | last loss Horovod / ours | ms per step Horovod / ours |")
    print("|---:|---|---:|---:|---:|---:|---|---|")
    for world in args.worlds:
        for op in ("Adasum", "Average"):
            hvd_run, ours = results[world, op, "horovod"], results[world, op, "adasum"]
            other = results[world, "Average" if op == "Adasum" else "Adasum", "adasum"]
            differing = (_flat(hvd_run["first"]) != _flat(ours["first"])).double().mean().item()
            ms = [statistics.median(r["times"][WARMUP:]) * 1e3 for r in (hvd_run, ours)]
            print(f"| {world} | {op} | {_relative(ours['first'], hvd_run['first']):.1e} | {differing:.2%} | "
                  f"{_relative(ours['last'], hvd_run['last']):.1e} | {_relative(other['last'], ours['last']):.1e} | "
                  f"{hvd_run['loss']:.4f} / {ours['loss']:.4f} | {ms[0]:.2f} / {ms[1]:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["compare", "worker"], default="compare")
    parser.add_argument("--horovod-python", default="/work/hvd-venv/venv/bin/python",
                        help="a Python with Horovod built with MPI (../shared/anchors/install_horovod.sh)")
    parser.add_argument("--worlds", type=comma_list(int), default="2,4", metavar="N,...",
                        help="world sizes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--impl", choices=["horovod", "adasum"], help="worker: which hvd to import")
    parser.add_argument("--op", choices=["Adasum", "Average"], default="Adasum")
    parser.add_argument("--out", help="worker: where rank 0 writes its results")
    args = parser.parse_args(argv)
    (worker if args.mode == "worker" else compare)(args)


if __name__ == "__main__":
    main()
