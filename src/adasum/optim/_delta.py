r"""Delta mode's local half, written once: one worker's step turned into its parameter delta.

.. math::  \delta = \mathrm{opt}(x, g) - x

The optimizer steps its parameters in place from the values ``start``; afterwards the
parameters hold the delta, ready to be reduced in place with the other workers' deltas and added
back to ``start``. :class:`~adasum.optim.DistributedOptimizer` does this on every rank; the
simulator of ``adasum.lab`` does it for each simulated worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["local_delta", "take_delta", "apply_delta"]


def local_delta(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    closure: Callable[[], Any] | None = None,
) -> Any:
    """Step ``optimizer`` (whose parameters ``params`` hold the values ``start``) and leave
    ``params`` holding their deltas, new - start, in place. Returns what the step returns."""
    loss = optimizer.step(closure) if closure is not None else optimizer.step()
    take_delta(params, start)
    return loss


def take_delta(params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> None:
    """``params`` become new - start, in place: their deltas."""
    with torch.no_grad():
        torch._foreach_sub_([p.detach() for p in params], list(start))


def apply_delta(params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> None:
    """``params`` (holding deltas) become start + delta, in place."""
    with torch.no_grad():
        torch._foreach_add_([p.detach() for p in params], list(start))
