r"""Statistics of the pairwise combinations: what each Adasum saw, per layer.

For every pair (a, b) that the reduction combines, per layer, the float64 partials
(a.b, |a|^2, |b|^2) from which its coefficients came are kept. Two numbers follow from them:

* the cosine  :math:`c = a\cdot b / (\lVert a\rVert \lVert b\rVert)`;
* the effective scaling of the sum,

  .. math::  s = \frac{\langle \mathrm{Adasum}(a, b),\, a + b\rangle}{\lVert a + b\rVert^2}
               = \frac{c_a (|a|^2 + a\cdot b) + c_b (a\cdot b + |b|^2)}{|a|^2 + 2 a\cdot b + |b|^2},

  with the coefficients :math:`c_a, c_b` of the operator. Parallel vectors give s = 0.5 (Adasum
  averaged them), orthogonal ones s = 1 (Adasum summed them); for two vectors of equal norm
  s = 1 - c/2 exactly. Only vectors that point partly against each other (c < 0) give s > 1
  (every such pair of equal norms does, up to 1.5): Adasum subtracts half of each one's
  projection on the other, which is negative there, so it keeps more than their sum, in which
  they partly cancel.

Reading them for the learning rate: scalings near 0.5 at every level mean the ranks agree and
Adasum behaves like averaging, so the learning rate tuned for one rank's batch is already right;
scalings near 1 mean Adasum adds the ranks' contributions up, so one step does the work of up to
N single-rank steps and that rate should not be scaled up further. Scalings above 1 mean the
ranks' contributions partly point against each other.

The same numbers give the gradient noise scale (:mod:`adasum._noise`): the first stage's pairs
hold squared norms of single ranks' gradients and of pairs' means, the two batch sizes its
estimator needs. :meth:`Stats.noise_scale` reads it.

Statistics never change the result: a reduction computes the partials anyway, and asking for
them only keeps them (and, in the distributed algorithm, sends them once to every rank).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adasum import _order
from adasum._noise import Moments, NoiseScale, noise_scale, pair_moments
from adasum._ops import coefficients

__all__ = ["Stats", "empty_stages", "pair_metrics"]


def empty_stages(ranks: int, num_layers: int) -> list[torch.Tensor]:
    """Zeroed ``[pairs, 3, layers]`` float64 tensors, one per stage of the schedule of ``ranks``."""
    return [torch.zeros(len(stage), 3, num_layers, dtype=torch.float64) for stage in _order.schedule(ranks)]


def pair_metrics(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and effective scaling from ``[..., 3, layers]`` partials (a.b, |a|^2, |b|^2).

    Both come back shaped ``[..., layers]`` in float64; NaN where undefined (a zero vector for
    the cosine, a + b = 0 for the scaling).
    """
    parts = partials.movedim(-2, 0).to(torch.float64)
    dot, aa, bb = parts[0], parts[1], parts[2]
    cosine = dot / torch.sqrt(aa * bb)
    ca, cb = coefficients(parts)
    scale = (ca * (aa + dot) + cb * (dot + bb)) / (aa + 2.0 * dot + bb)
    return cosine, scale


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


@dataclass(frozen=True)
class Stats:
    """What each combination saw, per layer.

    ``stages[s]`` is a float64 tensor ``[pairs, 3, layers]`` holding a.b, |a|^2 and |b|^2 of
    every pair that stage s of :func:`adasum.schedule` combined (the fold, if any, is stage 0),
    for every layer in the order the layers were given. ``names`` optionally names the layers.
    A reduction without pairwise combinations (one rank, averaging, summing) has no stages.

    ``moments`` are the squared gradient norms at two batch sizes behind :meth:`noise_scale`.
    When not given they come from the first stage's pairs, whose operands are single ranks'
    inputs; a reduction whose first operands are not (hierarchical mode: node averages; delta
    mode: optimizer updates, not gradients) passes its own.
    """

    stages: tuple[torch.Tensor, ...]
    names: tuple[str, ...] | None = None
    moments: Moments | None = None

    def __post_init__(self) -> None:
        if self.moments is None and self.stages and self.stages[0].shape[0]:
            object.__setattr__(self, "moments", pair_moments(self.stages[0]))

    @property
    def num_layers(self) -> int:
        if self.stages:
            return self.stages[0].shape[-1]
        return self.moments.small.numel() if self.moments is not None else 0

    def cosines(self) -> list[torch.Tensor]:
        """Per stage, ``[pairs, layers]`` cosine between the combined vectors (NaN where one
        of them is zero)."""
        return [pair_metrics(s)[0] for s in self.stages]

    def noise_scale(self, batch: float) -> NoiseScale:
        """The gradient noise scale per layer and of the whole model (:class:`adasum.NoiseScale`;
        ``.simple()`` is B_simple in examples), for ranks whose gradients each average ``batch``
        examples (per-rank batch times accumulation steps). NaN without moments (one rank)."""
        return noise_scale(self.moments, batch, self.num_layers, self.names)

    def named(self, names: Sequence[str]) -> Stats:
        """The same statistics with the layers named (``names`` in layer order)."""
        if (self.stages or self.moments is not None) and len(names) != self.num_layers:
            raise ValueError(f"{len(names)} names for {self.num_layers} layers")
        return Stats(self.stages, tuple(names), self.moments)

    @staticmethod
    def concat(parts: Sequence[Stats]) -> Stats:
        """Join statistics of disjoint sets of layers reduced over the same ranks (one per DDP
        bucket, say) into one, layers in the given order."""
        parts = [p for p in parts if p.stages or p.moments is not None]
        if not parts:
            return Stats(())
        stages = tuple(torch.cat(stage, dim=2) for stage in zip(*(p.stages for p in parts)))
        names = None
        if all(p.names is not None for p in parts):
            names = tuple(n for p in parts for n in p.names or ())
        moments = None
        if all(p.moments is not None for p in parts):
            moments = functools.reduce(Moments.concat, (p.moments for p in parts if p.moments is not None))
        return Stats(stages, names, moments)

    def summary(self, prefix: str = "adasum", *, batch: float | None = None) -> dict[str, float]:
        """``{name: float}`` for a logger: means over the pairs combined, ignoring undefined
        values (NaN when nothing is defined).

        * ``{prefix}/scale``, ``{prefix}/cos``: over every pair, layer and stage;
        * ``{prefix}/level{s}/scale``, ``.../cos``: per stage s;
        * ``{prefix}/layer/{name}/scale``, ``.../cos``: per layer over all stages, ``name`` from
          :attr:`names` or the layer's index;
        * with ``batch`` (examples behind one rank's gradient), the noise scale under
          ``{prefix}/noise/...`` (:meth:`NoiseScale.summary`).

        No stages give an empty dict, but for the noise scale.
        """
        noise = self.noise_scale(batch).summary(f"{prefix}/noise") if batch is not None else {}
        if not self.stages:
            return noise
        names = self.names or [str(i) for i in range(self.stages[0].shape[-1])]
        per_stage = [pair_metrics(stage) for stage in self.stages]  # each ([pairs, layers],) * 2
        cosines = torch.cat([c for c, _ in per_stage], dim=0)
        scales = torch.cat([s for _, s in per_stage], dim=0)
        out = {f"{prefix}/scale": _mean(scales), f"{prefix}/cos": _mean(cosines)}
        for s, (cos, scale) in enumerate(per_stage):
            out[f"{prefix}/level{s}/scale"] = _mean(scale)
            out[f"{prefix}/level{s}/cos"] = _mean(cos)
        for i, name in enumerate(names):
            out[f"{prefix}/layer/{name}/scale"] = _mean(scales[:, i])
            out[f"{prefix}/layer/{name}/cos"] = _mean(cosines[:, i])
        return {**out, **noise}
