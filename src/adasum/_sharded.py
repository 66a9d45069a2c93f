"""Adasum as a reduce-scatter: the halving phase alone, for sharded data parallel.

The input is what FSDP hands its reduce-scatter: ``N`` rows, one per rank, row r holding shard
r of every parameter end to end (each parameter padded to a multiple of N, the padding zero).
Each parameter is one layer: its dot products span its segments in all N rows. The output of
rank r is row r of the Adasum of all ranks' inputs, in the order of :mod:`adasum._order`, at
the bytes of a reduce-scatter.

How: the rows are grouped into *blocks*, one per leaf of the plan (a leaf that absorbs its
partner in the fold owns both ranks' rows), and the blocks are laid out in bit-reversed leaf
order. Then VHDD's halving (:func:`adasum._vhdd.reduce_scatter`) with the slices halved at block
boundaries keeps, at level k, exactly the blocks of the leaves whose bit k equals this leaf's,
so that after the last level each leaf holds its own block. A leaf that absorbed rank 2i+1 hands
it row 2i+1 at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from adasum import _order, _vhdd
from adasum._buffers import Buffers
from adasum._layout import DtypeGroup, Flats
from adasum._ops import offsets_of
from adasum._p2p import Link
from adasum._plan import Plan, plan_of

__all__ = ["RowLayout", "row_layout", "reduce_scatter"]


def _bit_reversed(i: int, bits: int) -> int:
    return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0


@dataclass(frozen=True)
class RowLayout:
    """Where every rank's row lies in the permuted buffer, and the segments of its layers."""

    order: tuple[int, ...]  # ranks' rows, in buffer order
    bounds: tuple[int, ...]  # element offsets of the block boundaries in the buffer
    segments: DtypeGroup  # one segment per (row, parameter), each tagged with its parameter

    def split(self, lo: int, hi: int) -> int:
        """Halve [lo, hi), which spans a power-of-two number of blocks, at a block boundary."""
        first, last = self.bounds.index(lo), self.bounds.index(hi)
        return self.bounds[(first + last) // 2]

    def slot(self, rank: int, row_numel: int) -> int:
        """Element offset of ``rank``'s row in the buffer."""
        return self.order.index(rank) * row_numel


@lru_cache(maxsize=64)
def row_layout(world: int, numels: tuple[int, ...], dtype: torch.dtype) -> RowLayout:
    """The layout of ``world`` rows of segments of ``numels`` elements (one per parameter)."""
    p = _order.largest_power_of_two(world)
    leaves = _order.leaves(world)
    bits = p.bit_length() - 1
    order, bounds = [], [0]
    row = sum(numels)
    for position in range(p):
        leaf_rank = leaves[_bit_reversed(position, bits)]
        block = [leaf_rank, leaf_rank + 1] if leaf_rank < 2 * (world - p) else [leaf_rank]
        order += block
        bounds.append(bounds[-1] + len(block) * row)
    layers = tuple(i for _ in range(world) for i in range(len(numels)))
    segments = DtypeGroup(dtype, layers, offsets_of(list(numels) * world))
    return RowLayout(tuple(order), tuple(bounds), segments)


def reduce_scatter(
    output: torch.Tensor,
    rows: torch.Tensor,
    numels: Sequence[int],
    group: dist.ProcessGroup | None,
    buffers: Buffers,
) -> None:
    """``output`` = this rank's row of the per-parameter Adasum of all ranks' ``rows``
    (``[world * row]`` elements, row r at offset r * row, parameters of ``numels`` elements end
    to end in every row). ``rows`` is left unchanged."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    row = sum(numels)
    if world == 1:
        output.copy_(rows)
        return
    plan: Plan = plan_of(world, rank)
    layout = row_layout(world, tuple(numels), rows.dtype)
    buffer = buffers.get("rows", rows, rows.numel())
    torch.index_select(rows.view(world, row), 0, torch.tensor(layout.order), out=buffer.view(world, row))
    flats = Flats([buffer], [layout.segments], len(numels))
    link = Link(group)
    scratch = lambda like, n: buffers.get("recv", like, n)  # noqa: E731
    _vhdd.fold(flats, plan, link, scratch, None)
    if plan.leaf is not None:
        _vhdd.reduce_scatter(flats, plan, link, scratch, None, layout.split)
        mine = layout.slot(rank, row)
        output.copy_(buffer[mine : mine + row])
    if plan.fold_partner is not None:
        # The folded rank's row was reduced by its leaf: one row travels back, not the buffer.
        if plan.leaf is None:
            link.exchange(plan.fold_partner, [], [output])
        else:
            theirs = layout.slot(plan.fold_partner, row)
            link.exchange(plan.fold_partner, [buffer[theirs : theirs + row]], [])
