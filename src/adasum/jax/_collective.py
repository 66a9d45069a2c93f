"""The Adasum all-reduce over a named axis, built from JAX collectives (``ppermute``,
``all_gather``) for use inside ``jax.shard_map`` or ``jax.pmap``.

Three stages, in the order of :func:`adasum._order.schedule`:

1. :func:`_fold` (N not a power of two): device 2i+1 sends its arrays to device 2i, which
   combines the pair; the p = largest_power_of_two(N) survivors are the *leaf devices*.
2. :func:`_reduce_scatter`: each array is viewed as p rows (:func:`_to_rows`); at leaf distance
   d = 1, 2, 4, ... a leaf device keeps half of its rows, swaps the other half with the leaf
   device d away, and combines the two halves with coefficients that the 2d devices holding
   pieces of the same two vectors derive from the same numbers (:func:`_halves`). Leaf device
   j ends with row j of the result.
3. :func:`_all_gather_rows`: every device receives every row, so all hold the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adasum import _order as order
from adasum.jax._operator import Sums, active_sums, check_leaf, combine

__all__ = ["all_reduce"]


def _to_rows(x: jax.Array, p: int) -> jax.Array:
    """The array flattened, zero-padded and viewed as ``[p, ceil(size / p)]``; zeros add nothing
    to the dot products."""
    width = -(-x.size // p)
    flat = jnp.pad(x.reshape(-1), (0, p * width - x.size))
    return flat.reshape(p, width)


def _from_rows(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_to_rows`: the padding dropped, the shape restored."""
    return rows.reshape(-1)[: math.prod(shape)].reshape(shape)


def _tree_distances(n: int) -> list[int]:
    """Leaf distance of each tree stage of :func:`adasum._order.schedule` (1, 2, 4, ...)."""
    stages = order.schedule(n)[1 if n != order.largest_power_of_two(n) else 0 :]
    firsts = [stage[0] for stage in stages]
    position = {rank: i for i, rank in enumerate(order.leaves(n))}  # every stage pairs leaves
    return [position[right] - position[left] for left, right in firsts]


def _combine_arrays(
    sums: Sums,
    xs: Sequence[jax.Array],
    ys: Sequence[jax.Array],
    totals: jax.Array,
    swapped: jax.Array | bool = False,
) -> list[jax.Array]:
    """``Adasum(x, y)`` for each pair of arrays, from their ``totals`` (one row per pair);
    where ``swapped``, the totals are those of ``Adasum(y, x)`` (the same vector), so the
    coefficients change places."""
    ca, cb = sums.coefficients(totals)
    ca, cb = jnp.where(swapped, cb, ca), jnp.where(swapped, ca, cb)
    return [combine(x, y, ca[i], cb[i]) for i, (x, y) in enumerate(zip(xs, ys))]


def _partials(sums: Sums, xs: Sequence[jax.Array], ys: Sequence[jax.Array]) -> jax.Array:
    """This device's partials for each pair of arrays: ``[len(xs), k]``."""
    return jnp.stack([sums.partials(x, y) for x, y in zip(xs, ys)])


def _fold(
    xs: list[jax.Array], axis_name: Hashable, n: int, rank: jax.Array, sums: Sums
) -> list[jax.Array]:
    """Stage 1 of the order when N is not a power of two: rank 2i combines with rank 2i+1."""
    pairs = order.schedule(n)[0]
    received = jax.lax.ppermute(xs, axis_name, perm=[(right, left) for left, right in pairs])
    totals = sums.totals(_partials(sums, xs, received)[None], axis=0)
    combined = _combine_arrays(sums, xs, received, totals)
    # Every device computes (SPMD); only the left member of a pair keeps the result.
    is_left = (rank < 2 * len(pairs)) & (rank % 2 == 0)
    return [jnp.where(is_left, c, x) for c, x in zip(combined, xs)]


def _halves(x: jax.Array, upper: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rows ``x`` keeps and the rows it sends: those at even and odd positions, the other
    way round on the upper partner (``upper`` = 1). The rows left after each stage keep the
    low bits of their index equal to the device's leaf position, so after the last stage leaf
    device j holds row j."""
    pairs = x.reshape(x.shape[0] // 2, 2, x.shape[1])
    keep = jax.lax.dynamic_index_in_dim(pairs, upper, axis=1, keepdims=False)
    send = jax.lax.dynamic_index_in_dim(pairs, 1 - upper, axis=1, keepdims=False)
    return keep, send


def _reduce_scatter(
    blocks: list[jax.Array], axis_name: Hashable, n: int, rank: jax.Array, sums: Sums
) -> list[jax.Array]:
    """The tree stages by vector halving: returns each leaf device's one row of the result.

    A device holds pieces of the left operand a (lower partner) or of the right one b (upper
    partner) and receives the other's. It reduces its own pieces to the per-leaf partials
    (a few numbers each) before any of them travel, and never builds a and b as arrays: the
    partials of (kept, received) are put in (a, b) order by exchanging two entries, and the
    coefficients in the other direction. ``ca * a + cb * b`` equals ``cb * b + ca * a`` to
    the bit, so the combination is the same either way round.
    """
    leaf_ranks = order.leaves(n)
    p = len(leaf_ranks)
    # Ranks folded away get position 0: they compute alongside, but nothing they hold is used.
    leaf = jnp.asarray([order.leaf_index(r, n) or 0 for r in range(n)], jnp.int32)[rank]
    for d in _tree_distances(n):
        upper = (leaf // d) % 2  # 1: this device holds pieces of the right operand
        is_upper = upper == 1
        keep, send = zip(*(_halves(x, upper) for x in blocks))
        perm = [(leaf_ranks[j], leaf_ranks[j ^ d]) for j in range(p)]
        received = jax.lax.ppermute(list(send), axis_name, perm=perm)
        parts = _partials(sums, keep, received)
        parts = jnp.where(is_upper, parts[:, np.asarray(sums.swap)], parts)
        # Every device sums the same gathered numbers in the same order: equal coefficients.
        gathered = jax.lax.all_gather(parts, axis_name)[np.asarray(leaf_ranks)]
        group = 2 * d
        totals = sums.totals(gathered.reshape(p // group, group, *parts.shape), axis=1)
        blocks = _combine_arrays(sums, keep, received, totals[leaf // group], swapped=is_upper)
    return blocks


def _all_gather_rows(blocks: list[jax.Array], axis_name: Hashable, n: int) -> list[jax.Array]:
    """Every device receives every row; the result is invariant over the axis (rule 5)."""
    gathered = jax.lax.all_gather(blocks, axis_name, to="invarying")
    leaf_ranks = order.leaves(n)
    if leaf_ranks == list(range(n)):  # leaf device j holds row j: the rows are in order
        return [g[:, 0] for g in gathered]
    return [g[np.asarray(leaf_ranks), 0] for g in gathered]


def all_reduce(tree: Any, axis_name: Hashable) -> Any:
    """Adasum of every leaf of ``tree`` over the devices of ``axis_name``.

    Call it inside ``jax.shard_map`` or ``jax.pmap`` (under ``jit`` or not). Each leaf is one
    layer (rule 1); leaf x of device r is ``x_r``, and every device receives
    ``Adasum(x_0, ..., x_{N-1})``, the operator applied in the order of
    :func:`adasum._order.schedule`, with identical bits on every device. Leaves must have the
    same shape and dtype on every device; supported dtypes are float16, bfloat16, float32 and
    float64. Empty leaves are returned as they are; one device is the identity. See
    :mod:`adasum.jax` for the algorithm and the accumulation precision.

    Raises TypeError for a leaf of another dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [check_leaf(x) for x in leaves]
    n = jax.lax.axis_size(axis_name)
    work = [i for i, x in enumerate(leaves) if x.size]
    if n == 1 or not work:
        return jax.tree.unflatten(treedef, leaves)
    sums = active_sums()
    rank = jax.lax.axis_index(axis_name)
    xs = [leaves[i] for i in work]
    p = order.largest_power_of_two(n)
    if n != p:
        xs = _fold(xs, axis_name, n, rank, sums)
    blocks = _reduce_scatter([_to_rows(x, p) for x in xs], axis_name, n, rank, sums)
    rows = _all_gather_rows(blocks, axis_name, n)
    for i, x, r in zip(work, xs, rows):
        leaves[i] = _from_rows(r, x.shape)
    return jax.tree.unflatten(treedef, leaves)
