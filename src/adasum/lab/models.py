"""The models of the task registry: small enough that a sweep over 64 simulated workers runs
in minutes on a laptop CPU, and free of batch statistics, so that per-worker gradients can be
taken with ``torch.func.vmap`` and equal what a real worker computes."""

from __future__ import annotations

from torch import nn

__all__ = ["MODELS", "build_model"]

MODELS = ("mlp", "cnn", "linear")


def build_model(name: str, inputs: int, outputs: int) -> nn.Module:
    """A fresh model (initialised from torch's global generator)."""
    if name == "linear":
        return nn.Linear(inputs, outputs)
    if name == "mlp":
        return nn.Sequential(nn.Linear(inputs, 64), nn.ReLU(), nn.Linear(64, outputs))
    if name == "cnn":
        side = int(round(inputs**0.5))
        if side * side != inputs:
            raise ValueError(f"the cnn needs square images, got {inputs} features")
        return nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (side // 2) ** 2, outputs),
        )
    raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
