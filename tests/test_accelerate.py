"""Adasum under Hugging Face Accelerate (adasum.ddp.use_adasum) on real Gloo processes.

One spawn of 2 ranks: ``Accelerator(cpu=True)`` finds the process group spawn made (as it
finds torchrun's), ``prepare`` wraps the model in DDP and ``use_adasum`` puts Adasum on it.
Gradient mode (SGD): one ``accelerator.backward`` gives gradients that the parent checks against
``adasum.reduce`` of the ranks' local ones. Delta mode (a prepared DistributedOptimizer(Adam)):
the gradients stay local and one step gives start + ``adasum.reduce`` of the ranks' own Adam
steps. Delta mode with Accelerate's gradient accumulation (``gradient_accumulation_steps=2``
and ``accelerator.accumulate``): two backward passes, one update from the mean of their
gradients. A last test runs examples/accelerate_digits.py in both modes under ``accelerate launch``.
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

from adasum.ddp import AdasumState, use_adasum  # noqa: E402
from adasum.launch import spawn  # noqa: E402
from adasum.optim import DistributedOptimizer  # noqa: E402
from conftest import TIMEOUT, caught, same_bits  # noqa: E402
from stacks import assert_adasum_of_local, assert_start_plus_adasum_of_adam_steps, local_gradients  # noqa: E402

WORLD = 2
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


LR = 0.05


def _step(rank: int, world: int, delta: bool, accum: int = 1) -> dict:
    """One update of this rank, from ``accum`` batches under ``accelerator.accumulate``."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(rank)  # different initialisations: prepare (DDP) must broadcast rank 0's
    net = _net()
    opt = DistributedOptimizer(torch.optim.Adam(net.parameters(), lr=LR)) if delta else torch.optim.SGD(net.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(net, opt)
    assert isinstance(model, DDP) and accelerator.num_processes == world
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(accum)]
    before = [p.detach().clone() for p in model.parameters()]
    state = use_adasum(model, optimizer)
    assert (state is None) == delta
    for k, batch in enumerate(batches):
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, batch))
            if k == accum - 1:  # what the update sees: the accumulated gradient
                grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
        if k < accum - 1:  # accumulating: nothing moved
            assert same_bits([p.detach() for p in model.parameters()], before)
    if state is not None:
        state.close()
    return {"batches": batches, "before": before, "grads": grads, "after": [p.detach().clone() for p in model.parameters()]}


def _local(run: dict) -> list[torch.Tensor]:
    """This rank's own gradient, on a plain copy of the model at the step's start: that of
    the mean of its batches' losses."""
    batches = run["batches"]
    return local_gradients(_net(), run["before"], lambda m: sum(_loss(m, b) for b in batches) / len(batches))


@pytest.mark.timeout(TIMEOUT + 30)
def test_gradients_of_the_prepared_model_are_adasum_of_local_ones():
    runs = spawn(_step, WORLD, False, timeout=TIMEOUT)
    assert same_bits(runs[0]["before"], runs[1]["before"])  # prepare broadcast rank 0's parameters
    assert_adasum_of_local([r["grads"] for r in runs], [_local(r) for r in runs])


def _delta_steps(rank: int, world: int) -> dict[int, dict]:
    """Delta mode without and with accumulation, in one spawn (each start costs seconds)."""
    return {accum: _step(rank, world, True, accum) for accum in (1, 2)}


@pytest.fixture(scope="module")
def delta_runs() -> list[dict[int, dict]]:
    return spawn(_delta_steps, WORLD, timeout=TIMEOUT)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("accum", [1, 2])
def test_delta_mode_parameters_are_start_plus_adasum_of_local_adam_steps(accum, delta_runs):
    runs = [r[accum] for r in delta_runs]
    local = [_local(r) for r in runs]
    for r, own in zip(runs, local):  # the no-op hook kept each rank's gradient its own
        for got, ref in zip(r["grads"], own):
            torch.testing.assert_close(got, ref)
    assert_start_plus_adasum_of_adam_steps([r["before"] for r in runs], [r["after"] for r in runs], local, LR)


def test_one_process_is_left_alone_and_delta_mode_refuses_a_state_and_a_mix():
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=LR)
    assert use_adasum(net, sgd) is None
    delta = DistributedOptimizer(torch.optim.Adam(net.parameters()))
    assert caught(lambda: use_adasum(net, [sgd, delta])).startswith(
        "ValueError: adasum: either every optimizer is a DistributedOptimizer")
    ddp = object.__new__(DDP)  # never used: the state is refused before the hook is registered
    assert caught(lambda: use_adasum(ddp, delta, adasum_state=AdasumState())).startswith(
        "ValueError: use_adasum: adasum_state is for gradient mode")


@pytest.mark.long
@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("mode", [[], ["--delta"]], ids=["gradient", "delta"])
def test_example_trains_under_accelerate_launch(mode):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run(
        [*launch, "accelerate_digits.py", "--epochs", "3", *mode], cwd=EXAMPLES, capture_output=True, text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8, done.stdout
