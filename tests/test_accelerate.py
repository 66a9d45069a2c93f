"""Adasum under Hugging Face Accelerate on real Gloo processes.

One spawn of 2 ranks: ``Accelerator(cpu=True)`` finds the process group spawn made (as it
finds torchrun's), ``prepare`` wraps the model in DDP, the hook goes onto it, and one
``accelerator.backward`` gives gradients that the parent checks against ``adasum.reduce`` of
the ranks' local ones. A last test runs examples/accelerate_digits.py under ``accelerate
launch``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from adasum.ddp import AdasumState, adasum_hook  # noqa: E402
from adasum.launch import spawn  # noqa: E402
from conftest import TIMEOUT, same_bits  # noqa: E402
from stacks import assert_adasum_of_local, local_gradients  # noqa: E402

WORLD = 2
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _step(rank: int, world: int) -> dict:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(rank)  # different initialisations: prepare (DDP) must broadcast rank 0's
    model = accelerator.prepare(_net())
    assert isinstance(model, DDP) and accelerator.num_processes == world
    g = torch.Generator().manual_seed(rank)
    batch = (torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
    before = [p.detach().clone() for p in model.parameters()]
    with AdasumState() as state:
        model.register_comm_hook(state, adasum_hook)
        accelerator.backward(_loss(model, batch))
    return {"batch": batch, "before": before, "grads": [p.grad.clone() for p in model.parameters()]}


@pytest.mark.timeout(TIMEOUT + 30)
def test_gradients_of_the_prepared_model_are_adasum_of_local_ones():
    runs = spawn(_step, WORLD, timeout=TIMEOUT)
    assert same_bits(runs[0]["before"], runs[1]["before"])  # prepare broadcast rank 0's parameters
    local = [local_gradients(_net(), r["before"], lambda m, r=r: _loss(m, r["batch"])) for r in runs]
    assert_adasum_of_local([r["grads"] for r in runs], local)


@pytest.mark.timeout(TIMEOUT + 30)
def test_example_trains_under_accelerate_launch():
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run(
        [*launch, "accelerate_digits.py", "--epochs", "3"], cwd=EXAMPLES, capture_output=True, text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8, done.stdout
