"""Point-to-point messages between partners, and the two small reductions built from them.

Every step of the algorithm talks to one partner at a time, so no step waits for all ranks at
once (on oversubscribed cores a collective over the whole group pays for the slowest rank's
scheduling at every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from adasum._plan import Plan

__all__ = ["Link", "leaf_reduce", "everyone_max"]


class Link:
    """Exchanges over one process group, addressed by group rank."""

    __slots__ = ("group",)

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def exchange(self, partner: int, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor]) -> None:
        """Send ``sends`` to and receive ``recvs`` from group rank ``partner``, all at once.

        Tags keep the tensors (one per dtype) apart; empty tensors are skipped on both sides,
        which agree on every size because they split the same ranges the same way.
        """
        peer = partner if self.group is None else dist.get_global_rank(self.group, partner)
        ops = [
            dist.P2POp(dist.isend, t, peer, self.group, tag) for tag, t in enumerate(sends) if t.numel()
        ] + [
            dist.P2POp(dist.irecv, t, peer, self.group, tag) for tag, t in enumerate(recvs) if t.numel()
        ]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()


def leaf_reduce(
    t: torch.Tensor,
    partners: Sequence[int],
    link: Link,
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``op`` (elementwise and commutative, like torch.add) of ``t`` over a block of leaves by
    recursive doubling: one exchange with each partner in turn. Partners apply ``op`` to the
    same two operands (a + b == b + a in IEEE arithmetic), so the block's members end with
    identical results."""
    for partner in partners:
        theirs = torch.empty_like(t)
        link.exchange(partner, [t], [theirs])
        t = op(t, theirs)
    return t


def everyone_max(t: torch.Tensor, plan: Plan, link: Link) -> torch.Tensor:
    """Elementwise maximum of ``t`` over all ranks of the plan's group, on every rank: the
    fold, the butterfly among the leaves, the unfold."""
    if plan.fold_partner is not None and plan.leaf is None:
        link.exchange(plan.fold_partner, [t], [])
        link.exchange(plan.fold_partner, [], [t])
        return t
    if plan.fold_partner is not None:
        theirs = torch.empty_like(t)
        link.exchange(plan.fold_partner, [], [theirs])
        t = torch.maximum(t, theirs)
    t = leaf_reduce(t, plan.level_partners(len(plan.levels) - 1), link, torch.maximum)
    if plan.fold_partner is not None:
        link.exchange(plan.fold_partner, [t], [])
    return t
