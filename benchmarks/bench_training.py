"""Training step time: Adasum's DDP hook, delta-mode optimizer and FSDP2 reduce-scatter against
the averaging they replace.

    python benchmarks/bench_training.py [--ranks 4] [--rounds 7] [--steps 5] [--setups a,b,...]

Seven setups train the same ~10M-parameter MLP on Gloo, each rank on its own batch:

    ddp-mean     DDP, default allreduce hook (average), SGD with momentum
    ddp-adasum   DDP, adasum_hook, SGD with momentum
    ddp-adam     DDP, default allreduce hook, Adam
    delta-adam   plain model, DistributedOptimizer(Adam): local step, Adasum of the deltas
    delta-adam-overlap
                 the same with overlap=True: each bucket stepped and its deltas reduced while
                 backward continues
    fsdp-mean    FSDP2 (fully_shard per layer and the root), default reduce-scatter, SGD momentum
    fsdp-adasum  the same with adasum.fsdp.use_adasum

They run interleaved (round r times every setup for --steps steps, then round r + 1), so slow
phases of a shared machine hit all of them alike; the table gives medians over the rounds of the
time per step and the ratios of each Adasum setup to its baseline, and the same for rank 0's
CPU time per step (all its threads: autograd, background reductions, Gloo's), the work a step
costs whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from adasum.ddp import AdasumState, adasum_hook
from adasum.fsdp import use_adasum
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer

WIDTHS = [1024, 2048, 2048, 1024, 1024, 512]  # about 10.0M parameters
BATCH = 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s inputs and targets (each rank trains on its own batch)."""
    gen = torch.Generator().manual_seed(rank)
    return torch.randn(BATCH, WIDTHS[0], generator=gen), torch.randn(BATCH, WIDTHS[-1], generator=gen)


def ddp_setup(hook: bool, adam: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = DDP(make_model())
    if hook:
        model.register_comm_hook(AdasumState(), adasum_hook)
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=1e-4) if adam else torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return model, opt


def delta_setup(overlap: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4), overlap=overlap)


def fsdp_setup(adasum: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    if adasum:
        use_adasum(model)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


#: name -> what builds the setup's (model, optimizer), in the order the rounds time them
SETUPS: dict[str, Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]]] = {
    "ddp-mean": lambda: ddp_setup(hook=False, adam=False),
    "ddp-adasum": lambda: ddp_setup(hook=True, adam=False),
    "ddp-adam": lambda: ddp_setup(hook=False, adam=True),
    "delta-adam": lambda: delta_setup(overlap=False),
    "delta-adam-overlap": lambda: delta_setup(overlap=True),
    "fsdp-mean": lambda: fsdp_setup(adasum=False),
    "fsdp-adasum": lambda: fsdp_setup(adasum=True),
}


def _worker(rank: int, world: int, rounds: int, steps: int, names: list[str]) -> dict[str, list[tuple[float, float]]]:
    x, y = batch(rank)
    setups = {name: SETUPS[name]() for name in names}

    def step(model, opt) -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for model, opt in setups.values():  # warm-up: DDP rebuilds its buckets after iteration 1
        for _ in range(2):
            step(model, opt)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}  # (wall, cpu) per step
    for _ in range(rounds):
        for name, (model, opt) in setups.items():
            dist.barrier()
            t0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(model, opt)
            cpu = time.process_time() - cpu0
            dist.barrier()
            times[name].append(((time.perf_counter() - t0) / steps, cpu / steps))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma list of the setups to time (default: all)")
    args = ap.parse_args()
    names = [n for n in SETUPS if n in args.setups.split(",")]
    if unknown := set(args.setups.split(",")) - set(SETUPS):
        ap.error(f"unknown setups {', '.join(sorted(unknown))}; choose from {', '.join(SETUPS)}")
    params = sum(p.numel() for p in make_model().parameters())
    times = spawn(_worker, args.ranks, args.rounds, args.steps, names, timeout=900)[0]
    med = {name: statistics.median(wall for wall, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
    print(f"{args.ranks} ranks (Gloo, CPU), {params / 1e6:.1f}M parameters, batch {BATCH} per rank, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print("| setup | ms / step | ratio | CPU ms / step | CPU ratio | target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    # (setup, its baseline, the most time per step it may take against it): the README's speed targets.
    rows = [("ddp-mean", None, None), ("ddp-adasum", "ddp-mean", 1.10),
            ("ddp-adam", None, None), ("delta-adam", "ddp-adam", 1.15), ("delta-adam-overlap", "ddp-adam", 1.10),
            ("fsdp-mean", None, None), ("fsdp-adasum", "fsdp-mean", 1.25)]
    for name, base, target in rows:
        if name not in med or (base is not None and base not in med):
            continue
        ratio = f"{med[name] / med[base]:.2f}x vs {base}" if base else ""
        cpu_ratio = f"{cpu[name] / cpu[base]:.2f}x" if base else ""
        print(f"| {name} | {1e3 * med[name]:.1f} | {ratio} | {1e3 * cpu[name]:.1f} | {cpu_ratio} | "
              f"{f'<= {target:.2f}x' if target else ''} |")


if __name__ == "__main__":
    main()
