"""Vector halving, distance doubling (VHDD): the distributed Adasum, phase by phase.

The input is one flat buffer per dtype (:class:`~adasum._layout.Flats`), the same layers on every rank; the
:class:`~adasum._plan.Plan` says what this rank does. Phases, in order:

1. :func:`fold`: rank 2i+1 < 2r hands its buffers to rank 2i, which combines the pair.
2. :func:`reduce_scatter`: among the p leaves, level by level, each leaf halves the slice it
   holds with its partner, keeps one half and receives the partner's values of it, computes the
   float64 per-layer partials (a.b, |a|^2, |b|^2) over its half, sums them over the 2d leaves
   holding pieces of the same two vectors (recursive doubling, one small message per step for
   all layers of all dtypes) and combines its half with the resulting coefficients.
3. :func:`all_gather`: the halves travel back in reverse order, so every leaf holds the result.
4. :func:`unfold`: rank 2i hands the result to rank 2i+1.

Where every rank's buffers are shards of longer vectors (HSDP: ``flats.shards``, the shard
group), each stage's per-layer partials are also summed over the shard group (:func:`totals`),
so that the coefficients are those of whole layers.

Each rank sends 2 S (p-1)/p bytes for S bytes of buffers, as a ring all-reduce does. Every
element of the result is computed by exactly one rank and copied to the others, so all ranks
hold bit-identical results. Statistics go to a :class:`Recorder`, which only keeps the totals
the arithmetic computed anyway and sends them to everyone in one message at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from adasum._groups import all_gather_single
from adasum._layout import Flats
from adasum._ops import coefficients, segment_combine, segment_partials
from adasum._p2p import Link, leaf_reduce
from adasum._plan import Plan
from adasum._stats import Stats

__all__ = ["Recorder", "run", "fold", "reduce_scatter", "all_gather", "unfold", "middle", "totals"]

#: A buffer of ``numel`` elements like the given tensor, reused across calls.
Scratch = Callable[[torch.Tensor, int], torch.Tensor]
Ranges = list[tuple[int, int]]
#: Where the slice [lo, hi) is halved.
Split = Callable[[int, int], int]


class Recorder:
    """Keeps this rank's per-layer totals of every stage it combined; :meth:`stats` sends them
    to every rank in one all-gather and assembles the whole :class:`Stats`."""

    def __init__(self, plan: Plan, num_layers: int, device: torch.device) -> None:
        self.plan = plan
        self.rows = torch.zeros(plan.stages, 3, num_layers, dtype=torch.float64, device=device)

    def record(self, stage: int, totals: torch.Tensor) -> None:
        self.rows[stage] = totals

    def stats(self, group: dist.ProcessGroup | None) -> Stats:
        plan = self.plan
        everyone = torch.empty((plan.world, *self.rows.shape), dtype=torch.float64, device=self.rows.device)
        all_gather_single(everyone.view(-1), self.rows.view(-1), group=group)
        everyone = everyone.cpu()
        stages = []
        folded = plan.world - len(plan.leaf_ranks)
        if folded:  # pair i of the fold was combined by rank 2i
            stages.append(everyone[0 : 2 * folded : 2, 0])
        d = 1
        while d < len(plan.leaf_ranks):  # pair j of a level by the first leaf of its block
            stages.append(everyone[list(plan.leaf_ranks[:: 2 * d]), len(stages)])
            d *= 2
        return Stats(tuple(stages))


def totals(flats: Flats, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``[3, num_layers]`` float64 partials (a.b, |a|^2, |b|^2) of whole layers from this
    rank's per-segment ``parts``: summed over each layer's segments
    (:meth:`~adasum._layout.Flats.partials_row`) and, where the buffers are shards
    (``flats.shards``, HSDP's shard group), over the shard group."""
    row = flats.partials_row(parts)
    if flats.shards is not None:
        dist.all_reduce(row, group=flats.shards)
    return row


def run(flats: Flats, plan: Plan, link: Link, scratch: Scratch, recorder: Recorder | None) -> None:
    """All four phases, in place on ``flats``."""
    fold(flats, plan, link, scratch, recorder)
    history = reduce_scatter(flats, plan, link, scratch, recorder)
    all_gather(flats, plan, link, history)
    unfold(flats, plan, link)


def fold(flats: Flats, plan: Plan, link: Link, scratch: Scratch, recorder: Recorder | None) -> None:
    if plan.fold_partner is None:
        return
    if plan.leaf is None:
        link.exchange(plan.fold_partner, flats.buffers, [])
        return
    theirs = [scratch(f, f.numel()) for f in flats.buffers]
    link.exchange(plan.fold_partner, [], theirs)
    row = totals(flats, [segment_partials(f, t, g.offsets) for f, t, g in zip(flats.buffers, theirs, flats.groups)])
    if recorder is not None:
        recorder.record(0, row)
    ca, cb = coefficients(row)
    for f, t, g, ids in zip(flats.buffers, theirs, flats.groups, flats.layer_ids):
        segment_combine(f, t, f, g.offsets, ca[ids], cb[ids])


def middle(lo: int, hi: int) -> int:
    """Where a slice is halved: by element count, ignoring layer boundaries."""
    return lo + (hi - lo) // 2


def _halves(ranges: Ranges, lower: bool, split: Split = middle) -> tuple[Ranges, Ranges]:
    """Each range cut in two at ``split``: (the halves kept, the halves sent)."""
    keeps, sends = [], []
    for lo, hi in ranges:
        mid = split(lo, hi)
        keeps.append((lo, mid) if lower else (mid, hi))
        sends.append((mid, hi) if lower else (lo, mid))
    return keeps, sends


def reduce_scatter(
    flats: Flats, plan: Plan, link: Link, scratch: Scratch, recorder: Recorder | None, split: Split = middle
) -> list[Ranges]:
    """The halving levels; returns the ranges held before each level (for :func:`all_gather`).
    ``split`` says where a slice is halved (by element count unless a caller needs the halves
    to fall on block boundaries, as the sharded reduce-scatter does)."""
    ranges: Ranges = [(0, f.numel()) for f in flats.buffers]
    history = []
    for k, level in enumerate(plan.levels):
        keeps, sends = _halves(ranges, level.lower, split)
        theirs = [scratch(f, hi - lo) for f, (lo, hi) in zip(flats.buffers, keeps)]
        link.exchange(level.partner, [f[lo:hi] for f, (lo, hi) in zip(flats.buffers, sends)], theirs)
        mine = [f[lo:hi] for f, (lo, hi) in zip(flats.buffers, keeps)]
        # Layers clipped to the kept slice; layers outside it become empty segments.
        local = [g.offsets.clamp(lo, hi) - lo for g, (lo, hi) in zip(flats.groups, keeps)]
        lefts, rights = (mine, theirs) if level.lower else (theirs, mine)
        parts = [segment_partials(a, b, off) for a, b, off in zip(lefts, rights, local)]
        row = leaf_reduce(totals(flats, parts), plan.level_partners(k), link, torch.add)
        if recorder is not None:
            recorder.record(level.stage, row)
        ca, cb = coefficients(row)
        for a, b, out, off, ids in zip(lefts, rights, mine, local, flats.layer_ids):
            segment_combine(a, b, out, off, ca[ids], cb[ids])
        history.append(ranges)
        ranges = keeps
    return history


def all_gather(flats: Flats, plan: Plan, link: Link, history: list[Ranges]) -> None:
    """The levels in reverse: each leaf sends the slice it holds and receives its partner's."""
    if not history:
        return
    held = _halves(history[-1], plan.levels[len(history) - 1].lower)[0]
    for level, parent in zip(reversed(plan.levels), reversed(history)):
        missing = _halves(parent, level.lower)[1]
        link.exchange(
            level.partner,
            [f[lo:hi] for f, (lo, hi) in zip(flats.buffers, held)],
            [f[lo:hi] for f, (lo, hi) in zip(flats.buffers, missing)],
        )
        held = parent


def unfold(flats: Flats, plan: Plan, link: Link) -> None:
    if plan.fold_partner is None:
        return
    if plan.leaf is None:
        link.exchange(plan.fold_partner, [], flats.buffers)
    else:
        link.exchange(plan.fold_partner, flats.buffers, [])
