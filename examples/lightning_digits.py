"""Adasum under PyTorch Lightning: an MLP on scikit-learn's digits, N processes on the CPU.

    python examples/lightning_digits.py                 # gradient mode: DDP hook + momentum SGD
    python examples/lightning_digits.py --delta         # delta mode: Adam per rank, Adasum of the updates
    python examples/lightning_digits.py --devices 4

Lightning starts the worker processes itself (it runs this script once more per extra device)
and splits the training set between them with a DistributedSampler.

Gradient mode: Lightning's ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` registers the
hook on CUDA devices only (lightning 2.6, ``DDPStrategy._register_ddp_hooks``); on the CPU it
drops it without a word and DDP averages. The ``AdasumHook`` callback below registers it on the
DDP module Lightning made, which works on every device (do not pass the hook to DDPStrategy as
well: DDP refuses a second hook).

Delta mode: manual optimization; every backward runs under ``block_backward_sync()`` (DDP's
``no_sync``), so DDP only broadcasts rank 0's initial parameters and each rank keeps its own
gradient, and the optimizer is wrapped in ``DistributedOptimizer``.
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from digits_data import N_TEST, digits
from lightning.pytorch.strategies import DDPStrategy

from adasum.ddp import AdasumState, adasum_hook
from adasum.optim import DistributedOptimizer


class Digits(L.LightningModule):
    """Gradient mode: automatic optimization, the hook (AdasumHook) combines the gradients."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.print(f"epoch {self.current_epoch}: val acc {self.trainer.callback_metrics['val_acc']:.3f}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The single-rank learning rate: Adasum does not divide by the world size.
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class DigitsDelta(Digits):
    """Delta mode: each rank steps its own Adam on its own gradient; DistributedOptimizer
    replaces the parameters by start + Adasum(all ranks' updates)."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = self.loss(batch)
        with self.trainer.strategy.block_backward_sync():  # DDP must not average the gradients
            self.manual_backward(loss)
        optimizer.step()  # local Adam step, then Adasum of the updates across ranks
        optimizer.zero_grad()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return DistributedOptimizer(torch.optim.Adam(self.parameters(), lr=self.lr))


class AdasumHook(L.Callback):
    """Adasum instead of DDP's averaging: the hook goes onto the DDP module at the start of fit."""

    def __init__(self) -> None:
        self.state = AdasumState()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(self.state, adasum_hook)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state.close()  # ends the hook's background thread and frees its process group


def digits_loaders(batch_size: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training and validation loaders over the digits (8x8 images scaled to [0, 1], 10
    classes); Lightning gives every rank its own part of each."""
    x, y = digits()
    train = torch.utils.data.TensorDataset(x[N_TEST:], y[N_TEST:])
    val = torch.utils.data.TensorDataset(x[:N_TEST], y[:N_TEST])
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=len(val)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="worker processes")
    parser.add_argument("--delta", action="store_true", help="delta mode (Adam) instead of the DDP hook (SGD)")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the ranks share the machine's cores
    L.seed_everything(0)
    model = DigitsDelta(lr=2e-3) if args.delta else Digits(lr=0.05)
    trainer = L.Trainer(
        strategy=DDPStrategy(process_group_backend="gloo"),
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        callbacks=[] if args.delta else [AdasumHook()],
        logger=False,
        enable_checkpointing=False,  # delta mode's Adam moments are per rank; see docs/training.md
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, *digits_loaders(batch_size=32))  # batch_size per rank
    # Lightning leaves the process group up. Gloo's threads must stop before the interpreter
    # does, or a rank may abort at exit ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
