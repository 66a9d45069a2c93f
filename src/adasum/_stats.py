r"""How orthogonal the combined vectors were: numbers a training loop can log.

For each pair (a, b) that Adasum combines, per layer, two numbers are derived from the float64
partials (a.b, |a|^2, |b|^2) that :class:`~adasum.TreeStats` records:

* the cosine  :math:`c = a\cdot b / (\lVert a\rVert \lVert b\rVert)`;
* the effective scaling of the sum,

  .. math::  s = \frac{\langle \mathrm{Adasum}(a, b),\, a + b\rangle}{\lVert a + b\rVert^2}
               = \frac{c_a (|a|^2 + a\cdot b) + c_b (a\cdot b + |b|^2)}{|a|^2 + 2 a\cdot b + |b|^2},

  with the coefficients :math:`c_a, c_b` of :func:`adasum.ops.coefficients`. Parallel vectors give
  s = 0.5 (Adasum averaged them), orthogonal ones s = 1 (Adasum summed them); for two vectors of
  equal norm s = 1 - c/2 exactly.

Reading them for the learning rate: scalings near 0.5 at every tree level mean the ranks'
gradients agree and Adasum behaves like averaging, so the learning rate tuned for averaging
(the per-rank batch's rate) is already right; scalings near 1 mean Adasum adds the ranks'
contributions up, so one step does the work of up to N single-rank steps and the per-rank
learning rate should not be scaled up further.

Nothing here runs unless asked for: the collectives compute the partials anyway, and keeping
them (``stats=True``) costs one small all-gather per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from adasum._ops import coefficients
from adasum._reduce import TreeStats

__all__ = ["pair_metrics", "summarize", "concat_layers"]


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


def concat_layers(parts: Sequence[TreeStats]) -> TreeStats:
    """Join TreeStats of disjoint sets of layers reduced over the same ranks (one per DDP bucket,
    say) into one, layers in the given order."""
    parts = [p for p in parts if p.stages]
    if not parts:
        return TreeStats(())
    return TreeStats(tuple(torch.cat(stage, dim=2) for stage in zip(*(p.stages for p in parts))))


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def summarize(
    stats: TreeStats, names: Sequence[str] | None = None, prefix: str = "adasum"
) -> dict[str, float]:
    """Flatten :class:`~adasum.TreeStats` into ``{name: float}`` for a logger.

    Keys (means over the pairs combined, ignoring undefined values, NaN when nothing is defined):

    * ``{prefix}/scale``, ``{prefix}/cos``: over every pair, layer and tree level;
    * ``{prefix}/level{s}/scale``, ``{prefix}/level{s}/cos``: per stage s of
      :func:`adasum._order.schedule` (the fold, if any, is stage 0);
    * ``{prefix}/layer/{name}/scale``, ``{prefix}/layer/{name}/cos``: per layer over all levels,
      ``name`` from ``names`` (in the reduced tensors' order) or the layer's index.

    One rank (no combinations) gives an empty dict.
    """
    if not stats.stages:
        return {}
    num_layers = stats.stages[0].shape[-1]
    if names is None:
        names = [str(i) for i in range(num_layers)]
    elif len(names) != num_layers:
        raise ValueError(f"{len(names)} names for {num_layers} layers")
    per_stage = [pair_metrics(stage) for stage in stats.stages]  # each [pairs, layers]
    cosines = torch.cat([c for c, _ in per_stage], dim=0)
    scales = torch.cat([s for _, s in per_stage], dim=0)
    out = {f"{prefix}/scale": _mean(scales), f"{prefix}/cos": _mean(cosines)}
    for s, (cos, scale) in enumerate(per_stage):
        out[f"{prefix}/level{s}/scale"] = _mean(scale)
        out[f"{prefix}/level{s}/cos"] = _mean(cos)
    for i, name in enumerate(names):
        out[f"{prefix}/layer/{name}/scale"] = _mean(scales[:, i])
        out[f"{prefix}/layer/{name}/cos"] = _mean(cosines[:, i])
    return out
