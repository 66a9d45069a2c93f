r"""The gradient noise scale: from data-parallel gradients, the batch size beyond which a larger
batch stops paying for itself.

McCandlish, Kaplan, Amodei et al., "An empirical model of large-batch training" (arXiv
1812.06162): with G the true gradient and :math:`\Sigma` the covariance of one example's
gradient, the gradient of the mean loss over B examples drawn independently has

.. math::  \mathbb{E}\,\lVert G_B\rVert^2 = \lVert G\rVert^2 + \operatorname{tr}(\Sigma) / B .

Squared norms at two batch sizes :math:`B_s < B_l` therefore give unbiased estimates of both
ingredients,

.. math::

    \lVert G\rVert^2 \approx \frac{B_l \lVert G_{B_l}\rVert^2 - B_s \lVert G_{B_s}\rVert^2}{B_l - B_s},
    \qquad
    \operatorname{tr}(\Sigma) \approx \frac{\lVert G_{B_s}\rVert^2 - \lVert G_{B_l}\rVert^2}{1/B_s - 1/B_l},

and their ratio :math:`B_\text{simple} = \operatorname{tr}(\Sigma) / \lVert G\rVert^2` is the
simple noise scale, the paper's estimate of the critical batch size: far below it, doubling the
batch halves the steps to a target; far above it, a larger batch saves no steps.

Data-parallel training holds both batch sizes at no cost: each rank's gradient (b examples) and
the mean of several ranks' gradients. :class:`Moments` keeps the two squared norms per layer;
which batches they stand for depends on the reduction (Adasum's first pairs: one rank and two
ranks; the average: one rank and all N). The ratio of two unbiased estimates is not unbiased and
one step's estimate is noisy (either ingredient can come out negative): :class:`RunningNoiseScale`
smooths the ingredients before dividing, as the paper does.

How to read it: B_simple (in examples) is about the critical batch. Where each rank's batch is
well below it, the ranks' gradients are mostly noise and close to orthogonal, and Adasum sums
them; where it is well above, they agree and Adasum averages them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Moments", "NoiseScale", "RunningNoiseScale", "pair_moments", "rank_moments", "noise_scale"]


class Moments(NamedTuple):
    """Per-layer squared gradient norms at two batch sizes, float64 ``[layers]`` each.

    ``small`` is the mean of |g|^2 over gradients each averaging ``small_ranks`` ranks'
    batches; ``large`` the mean of |g|^2 over gradients each averaging ``large_ranks`` ranks'
    batches. A rank's batch is the examples behind its gradient (per-rank batch times
    accumulation steps).
    """

    small: torch.Tensor
    large: torch.Tensor
    small_ranks: int
    large_ranks: int

    def concat(self, other: Moments) -> Moments:
        """The moments of both sets of layers, ``self``'s first."""
        if (self.small_ranks, self.large_ranks) != (other.small_ranks, other.large_ranks):
            raise ValueError("moments over different batch sizes cannot be joined")
        return Moments(torch.cat([self.small, other.small]), torch.cat([self.large, other.large]),
                       self.small_ranks, self.large_ranks)


def pair_moments(partials: torch.Tensor, ranks_per_operand: int = 1) -> Moments:
    """Moments from pairs of gradients: ``partials`` is ``[pairs, 3, layers]`` of (a.b, |a|^2,
    |b|^2), each operand the mean gradient of ``ranks_per_operand`` ranks. The small batch is one
    operand (|a|^2 and |b|^2), the large one a pair: |(a + b)/2|^2 = (|a|^2 + 2 a.b + |b|^2) / 4."""
    p = partials.to(torch.float64)
    dot, aa, bb = p[:, 0], p[:, 1], p[:, 2]
    small = ((aa + bb) / 2).mean(0)
    large = ((aa + 2 * dot + bb) / 4).mean(0)
    return Moments(small, large, ranks_per_operand, 2 * ranks_per_operand)


def rank_moments(stacked: Sequence[torch.Tensor]) -> Moments:
    """Moments from every rank's gradients, one ``[ranks, *shape]`` tensor per layer: the small
    batch is one rank, the large one all of them."""
    wide = [t.double().flatten(1) for t in stacked]
    small = torch.stack([t.square().sum(1).mean() for t in wide])
    large = torch.stack([t.mean(0).square().sum() for t in wide])
    return Moments(small.cpu(), large.cpu(), 1, stacked[0].shape[0])


@dataclass(frozen=True)
class NoiseScale:
    """Unbiased per-layer estimates of |G|^2 (``grad_sq``) and tr(Sigma) (``trace``, the
    per-example covariance's trace), float64 ``[layers]``; NaN where undefined (one rank)."""

    grad_sq: torch.Tensor
    trace: torch.Tensor
    names: tuple[str, ...] | None = None

    def simple(self) -> float:
        """B_simple of the whole model, in examples: the summed traces over the summed |G|^2
        (not a mean of the layers' ratios)."""
        return float(self.trace.sum() / self.grad_sq.sum())

    def per_layer(self) -> torch.Tensor:
        """B_simple of each layer alone, in examples."""
        return self.trace / self.grad_sq

    def summary(self, prefix: str = "noise") -> dict[str, float]:
        """``{prefix}/scale``, ``{prefix}/grad_sq``, ``{prefix}/trace`` of the whole model and
        ``{prefix}/layer/{name}/scale`` per layer, as floats for a logger."""
        out = {f"{prefix}/scale": self.simple(), f"{prefix}/grad_sq": float(self.grad_sq.sum()),
               f"{prefix}/trace": float(self.trace.sum())}
        names = self.names or [str(i) for i in range(self.grad_sq.numel())]
        out.update({f"{prefix}/layer/{n}/scale": float(v) for n, v in zip(names, self.per_layer())})
        return out


def noise_scale(moments: Moments | None, batch: float, num_layers: int = 0,
                names: Sequence[str] | None = None) -> NoiseScale:
    """The estimates from ``moments`` for ranks whose gradients each average ``batch`` examples
    (module docstring); NaN for every layer when there are no moments (one rank)."""
    if not batch > 0:
        raise ValueError(f"batch must be the positive number of examples behind one rank's gradient, got {batch}")
    names = tuple(names) if names is not None else None
    if moments is None:
        nan = torch.full((num_layers,), math.nan, dtype=torch.float64)
        return NoiseScale(nan, nan.clone(), names)
    b_small, b_large = moments.small_ranks * batch, moments.large_ranks * batch
    grad_sq = (b_large * moments.large - b_small * moments.small) / (b_large - b_small)
    trace = (moments.small - moments.large) / (1 / b_small - 1 / b_large)
    return NoiseScale(grad_sq, trace, names)


class RunningNoiseScale:
    """A smoothed noise scale for logging: exponential moving averages of the
    whole model's |G|^2 and tr(Sigma) (``decay`` per update), divided only when read. A step
    whose estimates are not finite (an overflow, one rank) is left out."""

    __slots__ = ("decay", "_grad_sq", "_trace", "_seen")

    def __init__(self, decay: float = 0.95) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._grad_sq = self._trace = 0.0
        self._seen = False

    def update(self, noise: NoiseScale) -> float:
        """Take one step's estimates; returns :attr:`value`."""
        grad_sq, trace = float(noise.grad_sq.sum()), float(noise.trace.sum())
        if math.isfinite(grad_sq) and math.isfinite(trace):
            d = self.decay
            self._grad_sq = d * self._grad_sq + (1 - d) * grad_sq
            self._trace = d * self._trace + (1 - d) * trace
            self._seen = True
        return self.value

    @property
    def value(self) -> float:
        """The smoothed B_simple in examples (NaN before the first finite update and while the
        gradients are zero). Both averages start at zero and so carry the same bias factor,
        which cancels in the ratio."""
        if not self._seen or self._grad_sq == 0.0:  # nothing yet, or no gradient at all
            return math.nan
        return self._trace / self._grad_sq
