"""The plan of the distributed algorithm: what one rank does, computed once per (size, rank).

With p the largest power of two <= N and r = N - p (:mod:`adasum._order`):

* *fold*: ranks 2i and 2i+1 (i < r) are partners; 2i+1 hands its vector to 2i and takes no
  further part until the *unfold* hands the result back. The others are the p *leaves*.
* *levels*: at level k (distance d = 2^k) leaf v pairs with leaf v ^ d. The lower leaf of the
  pair (v & d == 0) keeps the lower half of the slice both hold and is the left operand; its
  partner keeps the upper half. The partial dot products of level k are summed over the 2d
  leaves of v's aligned block by recursive doubling with the partners of levels 0..k.

Everything is in ranks of the process group (not global ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from adasum import _order

__all__ = ["Level", "Plan", "plan_of"]


@dataclass(frozen=True)
class Level:
    """One level of vector halving for one leaf."""

    distance: int
    partner: int  # group rank of the leaf ``distance`` away
    lower: bool  # keeps the lower half and is the left operand of the combination
    stage: int  # index of this level in :func:`adasum._order.schedule`
    pair: int  # index of this leaf's pair among the stage's pairs


@dataclass(frozen=True)
class Plan:
    """What rank ``rank`` of a group of ``world`` ranks does in the collective."""

    world: int
    rank: int
    leaf: int | None  # position among the leaves; None for a rank folded into its partner
    fold_partner: int | None  # the partner in the fold and unfold, if any
    leaf_ranks: tuple[int, ...]  # group rank of every leaf, in leaf order
    levels: tuple[Level, ...]  # empty for a folded rank

    @property
    def stages(self) -> int:
        """Stages of the schedule: the fold (if any) and the tree levels."""
        return len(_order.schedule(self.world))

    def level_partners(self, upto: int) -> list[int]:
        """The partners of levels 0..upto: recursive doubling over this leaf's block of
        2^(upto+1) leaves."""
        return [level.partner for level in self.levels[: upto + 1]]


@lru_cache(maxsize=64)
def plan_of(world: int, rank: int) -> Plan:
    """The plan of ``rank`` in a group of ``world`` ranks."""
    p = _order.largest_power_of_two(world)
    folded = world - p
    leaf_ranks = tuple(_order.leaves(world))
    me = _order.leaf_index(rank, world)
    fold_partner = rank ^ 1 if rank < 2 * folded else None
    levels = []
    if me is not None:
        first = 1 if folded else 0
        d, k = 1, 0
        while d < p:
            levels.append(Level(d, leaf_ranks[me ^ d], me & d == 0, first + k, me // (2 * d)))
            d, k = 2 * d, k + 1
    return Plan(world, rank, me, fold_partner, leaf_ranks, tuple(levels))
