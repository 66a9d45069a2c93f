"""torch.compile of a DDP model with the Adasum hook, on real Gloo processes.

For each backend, one spawn of 2 ranks compiles ``DDP(model)`` with the hook registered and
takes two SGD steps (DDP rebuilds its buckets after the first); the parent checks each step's
gradients against ``adasum.reduce`` of the ranks' local gradients computed eagerly, that the
model was compiled at all (a graph was captured) and that the hook saw several buckets.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from adasum.ddp import AdasumState, adasum_hook
from adasum.launch import spawn
from conftest import TIMEOUT
from stacks import assert_adasum_of_local, local_gradients

WORLD = 2
STEPS = 2
LR = 0.1


class Net(torch.nn.Module):
    """A class of its own: Dynamo does not compile nn.Sequential.forward behind DDP (see
    examples/compile_ddp.py). The 1 MiB hidden weight puts the layers in several buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 1024)
        self.hidden = torch.nn.Linear(1024, 256)
        self.out = torch.nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(torch.tanh(self.inp(x)))))


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(rank: int, world: int, backend: str) -> dict:
    torch.manual_seed(0)
    model = Net()
    # bucket_cap_mb may not be below DDP's first bucket (1 MiB): DDPOptimizer requires it.
    ddp = DDP(model, bucket_cap_mb=1)
    buckets: set[int] = set()

    def counting_hook(state, bucket):  # unannotated: DDP checks annotations against real types
        buckets.add(bucket.index())
        return adasum_hook(state, bucket)

    steps = []
    with AdasumState() as state:
        ddp.register_comm_hook(state, counting_hook)
        compiled = torch.compile(ddp, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 * rank + step)
            batch = (torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad(set_to_none=True)
            _loss(compiled, batch).backward()
            steps.append({"batch": batch, "before": before, "grads": [p.grad.clone() for p in model.parameters()]})
            opt.step()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return {"steps": steps, "buckets": len(buckets), "graphs": graphs}


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize(
    "backend",
    [pytest.param("inductor", marks=pytest.mark.skipif(not _has_cxx(), reason="inductor needs a C++ compiler")),
     "aot_eager"],
)
def test_compiled_ddp_gradients_are_adasum_of_local_ones(backend):
    runs = spawn(_train, WORLD, backend, timeout=TIMEOUT)
    for r in runs:
        assert r["graphs"] >= 1  # compiled, not silently eager
        assert r["buckets"] >= 2
    for step in range(STEPS):
        at = [r["steps"][step] for r in runs]
        local = [local_gradients(Net(), s["before"], lambda m, s=s: _loss(m, s["batch"])) for s in at]
        assert_adasum_of_local([s["grads"] for s in at], local)
