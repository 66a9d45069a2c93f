"""The optimizers a run can use, built the same way by the real and the simulated trainer."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["make_optimizer", "make_outer", "set_lr"]

MOMENTUM = 0.9


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """``sgd``, ``momentum`` (heavy ball, 0.9), ``adam`` (torch defaults) or ``lamb``
    (:class:`adasum.optim.Lamb`)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "lamb":
        from adasum.optim import Lamb

        return Lamb(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def make_outer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Local SGD's outer optimizer: ``sgd`` (plain) or ``nesterov`` (momentum 0.9, DiLoCo's)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, nesterov=True)
    raise ValueError(f"unknown outer optimizer {name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
