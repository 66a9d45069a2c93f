"""The baselines Adasum is measured against: the average and the sum of the ranks' tensors.

They run through the same interface, validation, packing, DDP hook and optimizer as Adasum, so
a difference in a study's result comes from the reduction, not from the code around it.
float16 and bfloat16 are summed in float32 (a sum of many values in bfloat16 would lose most of
the mantissa) and rounded once at the end. Their statistics have no stages (nothing is combined
pairwise) but the moments of the gradient noise scale: each rank's squared norms and the
result's, at the cost of one small all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from adasum._layout import Flats
from adasum._noise import Moments, rank_moments
from adasum._ops import segment_partials
from adasum._reduce import ranks_of
from adasum._reducer import Reducer
from adasum._stats import Stats
from adasum._vhdd import totals

__all__ = ["Average", "Sum", "sum_over"]


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_over(buffer: torch.Tensor, group: dist.ProcessGroup | None, divisor: int = 1) -> None:
    """``buffer`` = the sum over ``group`` of every rank's ``buffer`` / ``divisor``, in place,
    identical on every rank."""
    work = buffer if _wide(buffer.dtype) == buffer.dtype else buffer.to(_wide(buffer.dtype))
    dist.all_reduce(work, group=group)
    if divisor != 1:
        work.div_(divisor)
    if work is not buffer:
        buffer.copy_(work)


def _sum_ranks(per_rank, divisor: int, stats: bool):
    """The single-process counterpart of :func:`sum_over`, ranks added in rank order."""
    ranks, layout, single = ranks_of(per_rank)
    out = []
    for i, dtype in enumerate(layout.dtypes):
        total = ranks[0][i].to(_wide(dtype), copy=True)
        for tensors in ranks[1:]:
            total += tensors[i]
        out.append((total / divisor if divisor != 1 else total).to(dtype))
    result = out[0] if single else out
    if not stats:
        return result
    stacked = [torch.stack([tensors[i] for tensors in ranks]) for i in range(len(layout))]
    return result, Stats((), moments=rank_moments(stacked) if len(ranks) > 1 and stacked else None)


def _squared_norms(flats: Flats) -> torch.Tensor:
    """Per-layer float64 |x|^2 of the buffers, ``[layers]``."""
    return totals(flats, [segment_partials(f, f, g.offsets) for f, g in zip(flats.buffers, flats.groups)])[1]


class _Summing(Reducer):
    """The sum of every rank's tensors divided by :meth:`_divisor` of the number of ranks.
    Statistics: none (no pairwise combinations)."""

    def _divisor(self, ranks: int) -> int:
        return 1

    def reduce(self, per_rank, *, stats: bool = False):
        return _sum_ranks(per_rank, self._divisor(len(per_rank)), stats)

    def _reduce(self, flats: Flats, stats: bool) -> Stats | None:
        world = dist.get_world_size(self.group)
        divisor = self._divisor(world)
        small = _squared_norms(flats) if stats else None
        for buffer in flats.buffers:
            sum_over(buffer, self.group, divisor)
        if small is None:
            return None
        dist.all_reduce(small, group=self.group)
        # The result is the sum over the ranks divided by the divisor; its mean is over all ranks.
        large = _squared_norms(flats) * (divisor / world) ** 2
        return Stats((), moments=Moments(small.cpu() / world, large.cpu(), 1, world))


class Sum(_Summing):
    """The sum of every rank's tensors."""

    name = "sum"


class Average(_Summing):
    """The mean of every rank's tensors (what DDP computes)."""

    name = "average"

    def _divisor(self, ranks: int) -> int:
        return ranks
