"""What the training-stack tests (Lightning, Accelerate, torch.compile) share.

Each of their workers records, for one step, the parameters before it, its batch and the
gradients the optimizer saw; the parent recomputes every rank's local gradient on a plain copy
of the model, outside any framework, and checks the framework's result against
``adasum.reduce`` of those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import adasum
from conftest import same_bits


def local_gradients(
    model: torch.nn.Module, params: Sequence[torch.Tensor], loss: Callable[[torch.nn.Module], torch.Tensor]
) -> list[torch.Tensor]:
    """The gradient of ``loss(model)`` at ``params`` (in ``model.parameters()`` order)."""
    with torch.no_grad():
        for p, value in zip(model.parameters(), params, strict=True):
            p.copy_(value)
    model.zero_grad(set_to_none=True)
    loss(model).backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_adasum_of_local(reduced: Sequence[list[torch.Tensor]], local: Sequence[list[torch.Tensor]]) -> None:
    """Every rank's ``reduced`` gradients are bit-identical and equal (float32 tolerance) to
    ``adasum.reduce`` of the ranks' ``local`` ones, which must differ (or averaging would pass)."""
    assert not same_bits(local[0], local[1])
    expected = adasum.reduce([list(g) for g in local])
    for grads in reduced:
        assert same_bits(grads, reduced[0])
        for got, ref in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-7)
