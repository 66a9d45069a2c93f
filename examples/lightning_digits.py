"""Adasum under PyTorch Lightning: an MLP on scikit-learn's digits, N processes on the CPU.

    python examples/lightning_digits.py                 # gradient mode: Adasum of the gradients, momentum SGD
    python examples/lightning_digits.py --delta         # delta mode: Adam per rank, Adasum of the updates
    python examples/lightning_digits.py --devices 4

Lightning starts the worker processes itself (it runs this script once more per extra device)
and splits the training set between them with a DistributedSampler. ``import adasum.lightning``
registers the strategy name "adasum" (:class:`adasum.lightning.AdasumStrategy`, Lightning's DDP
with Adasum's hook); it picks the mode from the optimizer: delta mode when it is a
``DistributedOptimizer``. Both modes use automatic optimization. ``--checkpoint DIR`` saves a
checkpoint per epoch (in delta mode with every rank's Adam moments) and resumes from DIR/last.ckpt
when it is there.
"""

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from digits_data import N_TEST, digits

import adasum.lightning  # noqa: F401  (registers strategy="adasum")
from adasum.optim import DistributedOptimizer


class Digits(L.LightningModule):
    """Gradient mode: the strategy's DDP hook combines the gradients, every rank steps SGD on them."""

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return DistributedOptimizer(torch.optim.Adam(self.parameters(), lr=self.lr))


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
    parser.add_argument("--checkpoint", type=Path, help="save a checkpoint per epoch here, resume from last.ckpt")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the ranks share the machine's cores
    L.seed_everything(0)
    model = DigitsDelta(lr=2e-3) if args.delta else Digits(lr=0.05)
    saving = args.checkpoint is not None
    last = args.checkpoint / "last.ckpt" if saving else None
    trainer = L.Trainer(
        strategy="adasum",  # gloo on the CPU
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(args.checkpoint, save_last=True)] if saving else [],
        logger=False,
        enable_checkpointing=saving,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    resume = last if last is not None and last.exists() else None
    trainer.fit(model, *digits_loaders(batch_size=32), ckpt_path=resume)  # batch_size per rank
    # Lightning leaves the process group up (adasum would destroy it at exit in any case).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
