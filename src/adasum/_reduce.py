"""The single-process reducer: Adasum of N ranks' tensors, in the order of :mod:`adasum.order`.

It is the oracle the collective is tested against and the engine of the convergence
simulator. Each combination is one kernel call over all layers of a dtype, so the cost does not
grow with the number of layers beyond the packing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adasum import _order as order
from adasum._layout import DtypeGroup, Layout
from adasum._ops import coefficients, segment_combine, segment_partials

__all__ = ["reduce", "reduce_rows", "TreeStats"]

_ROWS_BUDGET = 1 << 26  # elements in flight at once, all ranks together


@dataclass(frozen=True)
class TreeStats:
    """What each combination saw, per layer.

    ``stages[s]`` is a float64 tensor ``[pairs, 3, layers]`` holding ``a.b``, ``|a|^2`` and
    ``|b|^2`` for every pair ``order.schedule(n)[s]`` combined, for every layer (in input order).
    """

    stages: tuple[torch.Tensor, ...]

    def cosines(self) -> list[torch.Tensor]:
        """Per stage, ``[pairs, layers]`` cosine of the angle between the combined vectors (NaN
        where one of them is zero)."""
        return [s[:, 0] / torch.sqrt(s[:, 1] * s[:, 2]) for s in self.stages]


def reduce(
    per_rank: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]], *, stats: bool = False
):
    """Adasum of all ranks' tensors, combined per layer in the order of rule 4.

    ``per_rank[r]`` is rank r's tensor, or rank r's list of tensors (layers), with the same
    shapes and dtypes on every rank. Returns one tensor, or one list of tensors, of those shapes
    and dtypes; with ``stats=True`` returns ``(result, TreeStats)``. The inputs are not changed.
    One rank is the identity (a copy).
    """
    if len(per_rank) == 0:
        raise ValueError("adasum.reduce needs at least one rank")
    single = isinstance(per_rank[0], torch.Tensor)
    ranks = [[t] if single else list(t) for t in per_rank]
    layout = Layout.of(ranks[0])
    for r, tensors in enumerate(ranks[1:], start=1):
        if not all(isinstance(t, torch.Tensor) for t in tensors) or len(tensors) != len(layout):
            raise ValueError(f"rank {r} has {len(tensors)} tensors, rank 0 has {len(layout)}")
        other = Layout.of(tensors)
        for i in range(len(layout)):
            if other.shapes[i] != layout.shapes[i] or other.dtypes[i] != layout.dtypes[i]:
                raise ValueError(
                    f"tensor {i} is {other.describe(i)} on rank {r} but {layout.describe(i)} on rank 0"
                )

    n = len(ranks)
    result = [torch.empty(s, dtype=d, device=ranks[0][i].device) for i, (s, d) in enumerate(zip(layout.shapes, layout.dtypes))]
    schedule = order.schedule(n)
    stage_stats = [
        torch.zeros(len(stage), 3, len(layout), dtype=torch.float64) for stage in schedule
    ]
    # Working through runs of layers keeps memory bounded (and in cache) for many ranks of a
    # large model: each layer's result depends on that layer alone.
    runs = layout.chunks(max(1 << 16, _ROWS_BUDGET // n))
    workspace: dict[torch.dtype, torch.Tensor] = {}
    for group in runs:
        if workspace.get(group.dtype, torch.empty(0)).numel() < n * group.numel:
            workspace[group.dtype] = torch.empty(n * group.numel, dtype=group.dtype, device=result[0].device)
        rows = workspace[group.dtype][: n * group.numel].view(n, group.numel)
        for row, tensors in zip(rows, ranks):
            layout.pack(tensors, group, out=row)
        reduce_rows(rows, group, stage_stats if stats else None)
        layout.unpack(rows[0], result, group)
    out = result[0] if single else result
    return (out, TreeStats(tuple(stage_stats))) if stats else out


def reduce_rows(rows: torch.Tensor, group: DtypeGroup, stage_stats: list[torch.Tensor] | None = None) -> None:
    """Adasum of the rows of ``rows`` (``[ranks, numel]``, one rank's layers of ``group`` end to
    end per row) in the order of rule 4, into ``rows[0]``; the other rows are overwritten.
    With ``stage_stats`` (one ``[pairs, 3, layers]`` tensor per stage, as in TreeStats) each
    combination's partials are written to the group's layers."""
    layer_index = torch.tensor(group.layers, dtype=torch.int64)
    for s, stage in enumerate(order.schedule(rows.shape[0])):
        for k, (left, right) in enumerate(stage):
            partials = segment_partials(rows[left], rows[right], group.offsets)
            ca, cb = coefficients(partials)
            segment_combine(rows[left], rows[right], rows[left], group.offsets, ca, cb)
            if stage_stats is not None:
                stage_stats[s][k][:, layer_index] = partials.cpu()
