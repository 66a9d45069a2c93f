"""The combination order (rule 4 of the contract), shared by every backend.

Adasum is not associative, so the order in which N vectors are combined is part of its
definition. With p the largest power of two <= N and r = N - p:

1. *fold*: ranks (0, 1), (2, 3), ..., (2r-2, 2r-1) are combined pairwise; each result takes
   the place of the lower rank of its pair. The survivors, ranks 0, 2, ..., 2r-2, 2r, ..., N-1,
   are the p *leaves*, in rank order.
2. *tree*: the leaves combine as a balanced binary tree: at distance d = 1, 2, 4, ... leaf j is
   combined with leaf j + d for every j divisible by 2d.

Every combination writes its result to the left operand's slot, so the result of the whole
reduction ends in slot 0. For N a power of two this is exactly the order of recursive vector
halving, the one Horovod uses.
"""

from __future__ import annotations

__all__ = [
    "largest_power_of_two",
    "leaves",
    "leaf_index",
    "schedule",
    "expression",
]


def _check_size(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of ranks must be a positive integer, got {n!r}")


def largest_power_of_two(n: int) -> int:
    """The largest power of two p <= n."""
    _check_size(n)
    return 1 << (n.bit_length() - 1)


def leaves(n: int) -> list[int]:
    """The ranks that hold the p leaves after the fold, in leaf order."""
    r = n - largest_power_of_two(n)
    return list(range(0, 2 * r, 2)) + list(range(2 * r, n))


def leaf_index(rank: int, n: int) -> int | None:
    """Position of ``rank`` among the leaves, or None for a rank that hands its vector to its
    left neighbour in the fold."""
    r = n - largest_power_of_two(n)
    if rank < 2 * r:
        return None if rank % 2 else rank // 2
    return rank - r


def schedule(n: int) -> list[list[tuple[int, int]]]:
    """The combinations for ``n`` ranks, stage by stage, as (left, right) rank slots.

    Within a stage the pairs are independent; the result goes to the left slot. The fold is the
    first stage when N is not a power of two; then come the log2(p) tree levels.
    """
    p = largest_power_of_two(n)
    r = n - p
    stages = []
    if r:
        stages.append([(2 * i, 2 * i + 1) for i in range(r)])
    leaf = leaves(n)
    d = 1
    while d < p:
        stages.append([(leaf[j], leaf[j + d]) for j in range(0, p, 2 * d)])
        d *= 2
    return stages


def expression(n: int) -> str:
    """The reduction of ``n`` ranks written out, e.g. ``A(A(0,1),2)`` for three ranks."""
    slots = [str(i) for i in range(n)]
    for stage in schedule(n):
        for left, right in stage:
            slots[left] = f"A({slots[left]},{slots[right]})"
    return slots[0]
