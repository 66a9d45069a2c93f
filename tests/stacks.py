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


def assert_start_plus_adasum_of_adam_steps(
    before: Sequence[list[torch.Tensor]], after: Sequence[list[torch.Tensor]], local: Sequence[list[torch.Tensor]], lr: float
) -> None:
    """Delta mode's first step: every rank's parameters ``after`` are bit-identical and equal to
    the common start ``before`` plus ``adasum.reduce`` of the ranks' own Adam steps, each taken
    from the start on that rank's ``local`` gradients."""
    assert same_bits(before[0], before[1])
    deltas = []
    for start, grads in zip(before, local, strict=True):
        params = [p.clone() for p in start]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        torch.optim.Adam(params, lr=lr).step()
        deltas.append([p.detach() - s for p, s in zip(params, start, strict=True)])
    expected = adasum.reduce(deltas)
    for params in after:
        assert same_bits(params, after[0])
        for got, start, d in zip(params, before[0], expected, strict=True):
            torch.testing.assert_close(got, start + d, rtol=1e-6, atol=1e-7)
