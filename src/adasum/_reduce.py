"""The single-process reduction: Adasum of N ranks' tensors, in the order of :mod:`adasum._order`.

It is the reference the distributed algorithm is tested against, the engine of the simulator,
and, run on gathered copies, the small-buffer path of the collective. Each combination is one
kernel call over all layers of a dtype, so the cost does not grow with the number of layers
beyond the packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adasum import _order
from adasum._check import local_problem, raise_first
from adasum._layout import DtypeGroup, Layout
from adasum._ops import coefficients, segment_combine, segment_partials
from adasum._stats import Stats, empty_stages

__all__ = ["reduce", "reduce_rows", "ranks_of"]

_ROWS_BUDGET = 1 << 26  # elements in flight at once, all ranks together


def ranks_of(per_rank: Sequence) -> tuple[list[list[torch.Tensor]], Layout, bool]:
    """``per_rank`` (one tensor or one list of tensors per rank) as lists, their common layout
    and whether each rank passed a single tensor. Raises TypeError or ValueError, as the
    collective does, for input it would refuse."""
    if len(per_rank) == 0:
        raise ValueError("adasum.reduce needs at least one rank")
    single = isinstance(per_rank[0], torch.Tensor)
    ranks = [[t] if isinstance(t, torch.Tensor) else list(t) for t in per_rank]
    described = []
    for tensors in ranks:
        problem = local_problem(tensors, None)
        layers = None if problem else [Layout.of(tensors).describe(i) for i in range(len(tensors))]
        described.append((problem, layers, ()))
    raise_first(described)
    return ranks, Layout.of(ranks[0]), single


def reduce(per_rank: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]], *, stats: bool = False):
    """Adasum of all ranks' tensors, combined per layer in the order of rule 4.

    ``per_rank[r]`` is rank r's tensor, or rank r's list of tensors (layers), with the same
    shapes and dtypes on every rank. Returns one tensor, or one list of tensors, of those shapes
    and dtypes; with ``stats=True`` returns ``(result, Stats)``. The inputs are not changed.
    One rank is the identity (a copy).
    """
    ranks, layout, single = ranks_of(per_rank)
    n = len(ranks)
    device = ranks[0][0].device if ranks[0] else torch.device("cpu")
    result = [torch.empty(s, dtype=d, device=device) for s, d in zip(layout.shapes, layout.dtypes)]
    stages = empty_stages(n, len(layout)) if stats else None
    # Working through runs of layers keeps memory bounded (and in cache) for many ranks of a
    # large model: each layer's result depends on that layer alone.
    workspace: dict[torch.dtype, torch.Tensor] = {}
    for group in layout.chunks(max(1 << 16, _ROWS_BUDGET // n)):
        if workspace.get(group.dtype, torch.empty(0)).numel() < n * group.numel:
            workspace[group.dtype] = torch.empty(n * group.numel, dtype=group.dtype, device=device)
        rows = workspace[group.dtype][: n * group.numel].view(n, group.numel)
        for row, tensors in zip(rows, ranks):
            layout.pack(tensors, group, out=row)
        reduce_rows(rows, group, stages)
        layout.unpack(rows[0], result, group)
    out = result[0] if single else result
    return (out, Stats(tuple(stages or ()))) if stats else out


def reduce_rows(rows: torch.Tensor, group: DtypeGroup, stages: list[torch.Tensor] | None = None) -> None:
    """Adasum of the rows of ``rows`` (``[ranks, numel]``, one rank's layers of ``group`` end to
    end per row) in the order of rule 4, into ``rows[0]``; the other rows are overwritten.
    With ``stages`` (one ``[pairs, 3, layers]`` tensor per stage, as in :class:`Stats`) each
    combination's partials are written to the group's layers."""
    layer_index = torch.tensor(group.layers, dtype=torch.int64)
    for s, stage in enumerate(_order.schedule(rows.shape[0])):
        for k, (left, right) in enumerate(stage):
            partials = segment_partials(rows[left], rows[right], group.offsets)
            ca, cb = coefficients(partials)
            segment_combine(rows[left], rows[right], rows[left], group.offsets, ca, cb)
            if stages is not None:
                stages[s][k][:, layer_index] = partials.cpu()
