"""The combination order (rule 4), pinned."""

import pytest

from adasum import _order as order


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, "0"),
        (2, "A(0,1)"),
        (3, "A(A(0,1),2)"),
        (4, "A(A(0,1),A(2,3))"),
        (5, "A(A(A(0,1),2),A(3,4))"),
        (6, "A(A(A(0,1),A(2,3)),A(4,5))"),
        (7, "A(A(A(0,1),A(2,3)),A(A(4,5),6))"),
        (8, "A(A(A(0,1),A(2,3)),A(A(4,5),A(6,7)))"),
    ],
)
def test_expression(n, expected):
    assert order.expression(n) == expected


def balanced(items: list[str]) -> str:
    """The contract's definition, written independently: fold the first 2r, then halve."""
    if len(items) == 1:
        return items[0]
    half = len(items) // 2
    return f"A({balanced(items[:half])},{balanced(items[half:])})"


@pytest.mark.parametrize("n", range(1, 40))
def test_expression_matches_the_definition(n):
    p = 1 << (n.bit_length() - 1)
    r = n - p
    leaves = [f"A({2 * i},{2 * i + 1})" for i in range(r)] + [str(i) for i in range(2 * r, n)]
    assert order.expression(n) == balanced(leaves)


@pytest.mark.parametrize("n", range(1, 20))
def test_leaves_and_schedule_are_consistent(n):
    leaves = order.leaves(n)
    assert len(leaves) == order.largest_power_of_two(n)
    for rank in range(n):
        idx = order.leaf_index(rank, n)
        assert (idx is None) == (rank not in leaves)
        if idx is not None:
            assert leaves[idx] == rank
    # Every rank but 0 is a right operand exactly once.
    rights = [right for stage in order.schedule(n) for _, right in stage]
    assert sorted(rights) == list(range(1, n))


def test_bad_sizes():
    with pytest.raises(ValueError):
        order.schedule(0)
