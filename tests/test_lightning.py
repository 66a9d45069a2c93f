"""Adasum under PyTorch Lightning: the classes of examples/lightning_digits.py on real Gloo
processes.

One spawn of 2 ranks fits the example's modules for one step each, in gradient mode (DDP +
the AdasumHook callback, momentum SGD) and in delta mode (manual optimization,
DistributedOptimizer(Adam)), recording the batch, the parameters before, the gradients the
optimizer sees and the parameters after. The parent recomputes every rank's local gradient on
a plain copy of the model and checks the reduction against ``adasum.reduce``. A last test runs
the example itself under Lightning's own launcher.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

import adasum  # noqa: E402
from adasum.launch import spawn  # noqa: E402
from conftest import TIMEOUT, same_bits  # noqa: E402
from stacks import assert_adasum_of_local, local_gradients  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from lightning_digits import AdasumHook, Digits, DigitsDelta  # noqa: E402

WORLD = 2
LR = 0.05


class Recorder(L.Callback):
    """What one training step saw on this rank."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: list[torch.Tensor], batch_idx: int
    ) -> None:
        self.seen["batch"] = [t.clone() for t in batch]
        self.seen["before"] = [p.detach().clone() for p in module.parameters()]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.seen["grads"] = [p.grad.clone() for p in module.parameters()]

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: object, batch: list[torch.Tensor], batch_idx: int
    ) -> None:
        self.seen["after"] = [p.detach().clone() for p in module.parameters()]


def _one_step(module: L.LightningModule, callbacks: list[L.Callback]) -> dict:
    # The same rows on every rank; Lightning's DistributedSampler gives each rank its own 8.
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.rand(WORLD * 8, 64, generator=g), torch.randint(0, 10, (WORLD * 8,), generator=g))
    recorder = Recorder()
    trainer = L.Trainer(
        strategy=DDPStrategy(process_group_backend="gloo"), accelerator="cpu", devices=WORLD, max_steps=1,
        callbacks=[*callbacks, recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return recorder.seen


def _fit(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
    gradient = _one_step(Digits(lr=LR), [AdasumHook()])
    torch.manual_seed(rank)
    delta = _one_step(DigitsDelta(lr=LR), [])
    return {"gradient": gradient, "delta": delta}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return spawn(_fit, WORLD, timeout=TIMEOUT)


def _local(run: dict) -> list[torch.Tensor]:
    """This rank's own gradient, on a plain copy of the model at the step's start."""
    return local_gradients(Digits(lr=LR), run["before"], lambda m: m.loss(run["batch"]))


@pytest.mark.timeout(TIMEOUT + 30)
def test_gradient_mode_gradients_are_adasum_of_local_ones(runs):
    steps = [r["gradient"] for r in runs]
    assert same_bits(steps[0]["before"], steps[1]["before"])  # DDP broadcast rank 0's parameters
    assert_adasum_of_local([s["grads"] for s in steps], [_local(s) for s in steps])
    for s in steps:
        # The first step of momentum SGD is p - lr * grad.
        for after, before, grad in zip(s["after"], s["before"], s["grads"]):
            torch.testing.assert_close(after, before - LR * grad)


@pytest.mark.timeout(TIMEOUT + 30)
def test_delta_mode_parameters_are_start_plus_adasum_of_local_adam_steps(runs):
    steps = [r["delta"] for r in runs]
    assert same_bits(steps[0]["before"], steps[1]["before"])
    deltas = []
    for s in steps:
        local = _local(s)
        for got, ref in zip(s["grads"], local):  # block_backward_sync kept the gradient local
            torch.testing.assert_close(got, ref)
        params = [p.clone() for p in s["before"]]
        for p, g in zip(params, local):
            p.grad = g
        torch.optim.Adam(params, lr=LR).step()
        deltas.append([p.detach() - b for p, b in zip(params, s["before"])])
    expected = adasum.reduce(deltas)
    for s in steps:
        assert same_bits(s["after"], steps[0]["after"])
        for after, before, d in zip(s["after"], s["before"], expected):
            torch.testing.assert_close(after, before + d, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("mode", [[], ["--delta"]], ids=["gradient", "delta"])
def test_example_trains_under_lightnings_launcher(mode):
    done = subprocess.run(
        [sys.executable, "lightning_digits.py", "--epochs", "2", *mode], cwd=EXAMPLES,
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8, done.stdout
