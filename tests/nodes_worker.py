"""One torchrun worker of tests/test_nodes.py: every front door, once, across torchrun agents.

Run as ``torchrun --nnodes=... --rdzv-backend=c10d ... tests/nodes_worker.py OUT_DIR``; each
rank writes ``OUT_DIR/rank{RANK}.pt`` holding its environment, the layout
:class:`adasum.Hierarchical` read from it, and the results of flat Adasum (both algorithms),
hierarchical Adasum, the DDP hook and delta mode (each with both reducers). The test computes
the same things in one process from :func:`rank_inputs`, :func:`build_model` and :func:`batch`,
which this module also exports, and compares.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import adasum
from adasum.ddp import AdasumState, adasum_hook
from adasum.optim import DistributedOptimizer

#: torchrun's variables the worker records (the test checks the layout against them).
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
#: Seconds a collective may wait before it raises, and before the worker ends itself: a hang
#: then fails the test instead of outliving it, even if its agent was killed.
GROUP_TIMEOUT = 60
LIFETIME = 240

LAYERS = [((7, 5), torch.float32), ((13,), torch.float64), ((4, 4), torch.bfloat16),
          ((3,), torch.float32), ((300,), torch.float32)]
LR = 0.01


def rank_inputs(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s tensors for the collectives: mixed dtypes, and a layer that is zero on
    every rank (it must stay zero)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape, dtype in LAYERS]
    out[3].zero_()
    return out


def build_model() -> torch.nn.Module:
    """The same small model on every rank (seeded), so DDP's initial broadcast changes nothing."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s local batch."""
    g = torch.Generator().manual_seed(rank)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def loss_of(model: torch.nn.Module, rank: int) -> torch.Tensor:
    x, y = batch(rank)
    return torch.nn.functional.mse_loss(model(x), y)


def reducers() -> dict[str, adasum.Reducer]:
    # Hierarchical() takes its node size from LOCAL_WORLD_SIZE, as a user's script would.
    return {"adasum": adasum.Adasum(), "hierarchical": adasum.Hierarchical()}


def run(rank: int) -> dict:
    out: dict = {"env": {k: int(os.environ[k]) for k in ENV}}
    for algorithm in ("vhdd", "gather"):
        tensors = rank_inputs(rank)
        adasum.Adasum(algorithm=algorithm).all_reduce(tensors)
        out[f"flat_{algorithm}"] = tensors
    h = adasum.Hierarchical()
    out["layout"] = {"nodes": h.nodes, "node": h.node, "local_rank": h.local_rank, "local_size": h.local_size,
                     "single_node": h.single_node}
    tensors = rank_inputs(rank)
    h.all_reduce(tensors)
    out["hierarchical"] = tensors
    for name, reducer in reducers().items():
        # Gradient mode: the hook replaces DDP's averaging; small buckets, so there are several.
        model = build_model()
        ddp = DDP(model, bucket_cap_mb=0.0005)
        ddp.register_comm_hook(AdasumState(reducer), adasum_hook)
        loss_of(ddp, rank).backward()
        out[f"hook_{name}"] = [p.grad.clone() for p in model.parameters()]
    for name, reducer in reducers().items():
        # Delta mode: each rank steps its own Adam, the parameter deltas are reduced.
        model = build_model()
        opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=LR), reducer)
        loss_of(model, rank).backward()
        opt.step()
        out[f"delta_{name}"] = [p.detach().clone() for p in model.parameters()]
    return out


def main(out_dir: str) -> None:
    signal.alarm(LIFETIME)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT))
    rank = dist.get_rank()
    result = run(rank)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank leaves while another may still need it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
