"""Adasum under PyTorch Lightning: ``Trainer(strategy="adasum")`` (adasum.lightning) on real
Gloo processes, with the modules of examples/lightning_digits.py.

One spawn of 2 ranks fits, for one step each: gradient mode (momentum SGD), delta mode under
automatic optimization (DistributedOptimizer(Adam)) and delta mode under manual optimization,
recording the batch, the parameters before, the gradients the optimizer sees and the
parameters after. The parent recomputes every rank's local gradient on a plain copy of the
model and checks the reduction against ``adasum.reduce``. Delta mode with
``accumulate_grad_batches=2`` takes one update from two batches. The delta-mode run then saves a
checkpoint, and a second fit resumes from it: each rank must get its own Adam moments back, and
from the states of one rank (a checkpoint of a smaller world) both ranks take that rank's.
A last test runs the example itself under Lightning's own launcher.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry  # noqa: E402

from adasum.launch import spawn  # noqa: E402
from adasum.lightning import PER_RANK, AdasumStrategy  # noqa: E402
from conftest import TIMEOUT, caught, same_bits  # noqa: E402
from stacks import assert_adasum_of_local, assert_start_plus_adasum_of_adam_steps, local_gradients  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from lightning_digits import Digits, DigitsDelta  # noqa: E402

WORLD = 2
LR = 0.05


class ManualDelta(DigitsDelta):
    """Delta mode under manual optimization, without ``block_backward_sync``: the strategy's
    no-op hook alone must keep each rank's gradient its own."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = self.loss(batch)
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss


class Recorder(L.Callback):
    """What the first optimizer step saw on this rank (its batches, the gradients, the
    parameters before and after), and the optimizer's state before it."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: list[torch.Tensor], batch_idx: int
    ) -> None:
        if "batches" not in self.seen:
            self.seen["before"] = [p.detach().clone() for p in module.parameters()]
            self.seen["state"] = _moments(trainer.optimizers[0].state_dict())
        if "grads" not in self.seen:
            self.seen.setdefault("batches", []).append([t.clone() for t in batch])

    def on_before_optimizer_step(
        self, trainer: L.Trainer, module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.seen.setdefault("grads", [p.grad.clone() for p in module.parameters()])

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: object, batch: list[torch.Tensor], batch_idx: int
    ) -> None:
        if "grads" in self.seen:  # the batch that ended with the optimizer's step
            self.seen.setdefault("after", [p.detach().clone() for p in module.parameters()])


def _moments(state_dict: dict) -> list[torch.Tensor]:
    """Adam's moments in an optimizer's ``state_dict()``, parameter by parameter ([] before
    the first step)."""
    state = state_dict["state"]
    return [state[i][k].clone() for i in sorted(state) for k in ("exp_avg", "exp_avg_sq")]


def _trainer(steps: int, recorder: Recorder, accumulate: int = 1) -> L.Trainer:
    return L.Trainer(
        strategy="adasum", accelerator="cpu", devices=WORLD, max_steps=steps, callbacks=[recorder], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
    )


def _data() -> torch.utils.data.DataLoader:
    # The same rows on every rank; Lightning's DistributedSampler gives each rank its own 8.
    g = torch.Generator().manual_seed(7)
    rows = WORLD * 16  # two steps
    data = torch.utils.data.TensorDataset(torch.rand(rows, 64, generator=g), torch.randint(0, 10, (rows,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _one_step(module: L.LightningModule, accumulate: int = 1) -> tuple[L.Trainer, dict]:
    recorder = Recorder()
    trainer = _trainer(1, recorder, accumulate)
    trainer.fit(module, _data())
    assert isinstance(trainer.strategy, AdasumStrategy)
    return trainer, recorder.seen


def _save_and_resume(trainer: L.Trainer, checkpoint: str) -> dict:
    """Save ``trainer``'s delta-mode state, then fit one more step from it in a new Trainer."""
    saved = _moments(trainer.optimizers[0].state_dict())
    trainer.save_checkpoint(checkpoint)
    recorder = Recorder()
    _trainer(2, recorder).fit(DigitsDelta(lr=LR), _data(), ckpt_path=checkpoint)
    # A checkpoint of one rank: both ranks take its state (rank r takes old rank r mod 1's).
    states = torch.load(checkpoint, weights_only=False)["optimizer_states"][0][PER_RANK]
    trainer.strategy.load_optimizer_state_dict({"optimizer_states": [{PER_RANK: states[:1]}]})
    mapped = _moments(trainer.optimizers[0].state_dict())
    return {"saved": saved, "restored": recorder.seen["state"], "mapped": mapped}


def _fit(rank: int, world: int, checkpoint: str) -> dict:
    runs, trainers = {}, {}
    for name, module, accumulate in (("gradient", Digits, 1), ("delta", DigitsDelta, 1), ("manual", ManualDelta, 1),
                                     ("accumulated", DigitsDelta, 2)):
        torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
        trainers[name], runs[name] = _one_step(module(lr=LR), accumulate)
    runs["resume"] = _save_and_resume(trainers["delta"], checkpoint)
    torch.distributed.barrier()  # rank 0 may read the checkpoint only once every rank has resumed
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    checkpoint = tmp_path_factory.mktemp("lightning") / "delta.ckpt"
    return spawn(_fit, WORLD, str(checkpoint), timeout=TIMEOUT), checkpoint


def _local(run: dict) -> list[torch.Tensor]:
    """This rank's own gradient, on a plain copy of the model at the step's start: that of
    the mean of its batches' losses."""
    batches = run["batches"]
    return local_gradients(Digits(lr=LR), run["before"], lambda m: sum(m.loss(b) for b in batches) / len(batches))


def test_the_name_adasum_is_registered_next_to_lightnings_own():
    assert StrategyRegistry["adasum"]["strategy"] is AdasumStrategy
    assert StrategyRegistry["adasum_spawn"]["init_params"] == {"start_method": "spawn"}
    assert StrategyRegistry["ddp"]["strategy"] is DDPStrategy
    assert caught(lambda: AdasumStrategy(ddp_comm_hook=lambda s, b: None)) == \
        "TypeError: AdasumStrategy registers Adasum's own DDP hook; it takes no ddp_comm_hook"


@pytest.mark.timeout(TIMEOUT + 30)
def test_gradient_mode_gradients_are_adasum_of_local_ones(runs):
    steps = [r["gradient"] for r in runs[0]]
    assert same_bits(steps[0]["before"], steps[1]["before"])  # DDP broadcast rank 0's parameters
    assert_adasum_of_local([s["grads"] for s in steps], [_local(s) for s in steps])
    for s in steps:
        # The first step of momentum SGD is p - lr * grad.
        for after, before, grad in zip(s["after"], s["before"], s["grads"]):
            torch.testing.assert_close(after, before - LR * grad)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("mode", ["delta", "manual", "accumulated"])
def test_delta_mode_parameters_are_start_plus_adasum_of_local_adam_steps(runs, mode):
    steps = [r[mode] for r in runs[0]]
    assert {len(s["batches"]) for s in steps} == {2 if mode == "accumulated" else 1}
    local = [_local(s) for s in steps]
    for s, own in zip(steps, local):  # the no-op hook kept each rank's gradient its own
        for got, ref in zip(s["grads"], own):
            torch.testing.assert_close(got, ref)
    assert_start_plus_adasum_of_adam_steps([s["before"] for s in steps], [s["after"] for s in steps], local, LR)


@pytest.mark.timeout(TIMEOUT + 30)
def test_delta_checkpoint_holds_and_restores_every_ranks_optimizer_state(runs):
    resumed = [r["resume"] for r in runs[0]]
    saved = torch.load(runs[1], weights_only=False)["optimizer_states"][0][PER_RANK]
    assert len(saved) == WORLD
    assert not same_bits(resumed[0]["saved"], resumed[1]["saved"])  # the ranks' moments differ
    for rank, r in enumerate(resumed):
        assert same_bits(_moments(saved[rank]), r["saved"])
        assert same_bits(r["restored"], r["saved"])  # each rank resumed with its own
        assert same_bits(r["mapped"], resumed[0]["saved"])  # from one rank's states: rank 0's


@pytest.mark.long
@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("mode", [[], ["--delta"]], ids=["gradient", "delta"])
def test_example_trains_under_lightnings_launcher(mode, tmp_path):
    done = subprocess.run(
        [sys.executable, "lightning_digits.py", "--epochs", "2", "--checkpoint", str(tmp_path), *mode], cwd=EXAMPLES,
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8, done.stdout
    assert (tmp_path / "last.ckpt").exists()
