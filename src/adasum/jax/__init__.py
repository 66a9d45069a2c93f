r"""Adasum for JAX: a collective for ``jax.shard_map`` and ``jax.pmap``, and Optax transformations.

    from adasum.jax import all_reduce, adasum, adasum_gradients

    all_reduce(tree, axis_name)          inside shard_map/pmap: every leaf replaced by the Adasum
                                         of that leaf over the devices of ``axis_name``
    adasum(inner, axis_name)             Optax, delta mode: the inner optimizer's per-device
                                         updates (deltas) are combined; its state stays per device
    adasum_gradients(axis_name)          Optax, gradient mode: the gradients are combined, to be
                                         chained before SGD or momentum

The semantics are those of :mod:`adasum.ops` and :mod:`adasum.order` (the contract, rules 1-6):
per leaf,

.. math::

    \mathrm{Adasum}(a, b) = \Bigl(1 - \frac{a\cdot b}{2\lVert a\rVert^2}\Bigr) a
                          + \Bigl(1 - \frac{a\cdot b}{2\lVert b\rVert^2}\Bigr) b ,

a squared norm below ``ZERO_GUARD`` gets the coefficient 1, the N devices are combined in the
order of :func:`adasum._order.schedule` for any N, and every device ends with the same bits.

**Algorithm.** With p the largest power of two <= N and r = N - p:

1. *fold*: device 2i+1 sends its leaves to device 2i (i < r), which combines the pair.
2. *reduce-scatter* (vector halving, distance doubling) among the p leaf devices: each leaf is
   padded and viewed as p rows; at distance d = 1, 2, 4, ... a device keeps half of the rows it
   holds and swaps the other half with the leaf device d away (``ppermute``). Each device computes
   the per-leaf partial ``a.b, |a|^2, |b|^2`` over its rows; these few scalars are exchanged with
   ``all_gather`` and summed, in one fixed order, over the 2d devices that hold pieces of the same
   two vectors, so all of them derive the same coefficients. After log2(p) levels each leaf
   device holds one row of the result.
3. *all-gather*: the rows are gathered on every device (the extra devices of the fold included).

Bytes sent per device are about 2 S (p-1)/p for S bytes of leaves, as for a ring allreduce; the
scalar exchanges add log2(p) tiny all-gathers. Each row of the result is computed on exactly one
device and then copied, so every device holds identical bits (rule 5); the result is typed as
invariant over ``axis_name``, like the result of ``psum``.

**Accumulation precision** (the dot products and squared norms behind the coefficients):

- x64 enabled (``jax_enable_x64``): float64, as in the PyTorch reference. Products of float32,
  float16 and bfloat16 elements are exact in float64; the sums are plain float64 sums.
- x64 disabled (JAX's default): float32 with a *compensated* sum. The products are added with
  Knuth's TwoSum, whose exact rounding errors are summed alongside: first in 1024 running sums
  per leaf (one pass of XLA's reduce), then by a pairwise cascade of the same kind, so that
  ``|computed - sum| <= eps |sum| + O(n / 1024 * eps**2) sum |x_i|`` with eps = 2**-24: about
  one rounding of the result for any practical length. Each product is itself rounded once to
  float32 (exact for float16 and bfloat16 elements). To keep squares of large or tiny float32
  values from overflowing or underflowing, each device scales a and b by powers of two (exact)
  that bring their largest element into [0.5, 1), and the scales are undone in the coefficients.
  A float32 vector that is not zero has a squared norm of at least 2e-90, far above
  ``ZERO_GUARD``, so in this mode the zero guard means "all elements are zero" exactly.

The combination ``ca * a + cb * b`` is computed as in :func:`adasum.ops.segment_combine` (float32
for float16 and bfloat16 leaves, float64 for float32 and float64 leaves; without x64, float32 for
float32 leaves), two products and a sum without fused multiply-add, then rounded once to the
leaf's dtype. With x64 enabled, the result therefore equals the PyTorch reference bit for bit
unless a float64 sum lands differently on a rounding boundary (its summation order differs).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adasum import _order as order
from adasum._ops import ZERO_GUARD

__all__ = ["all_reduce", "adasum", "adasum_gradients", "accumulation_dtype", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = tuple(
    np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
)


def accumulation_dtype() -> np.dtype:
    """float64 when JAX's x64 mode is on, float32 (with compensated sums) otherwise."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


# --------------------------------------------------------------------------------------------
# Exact and compensated float32 arithmetic


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = fl(a + b)`` and its rounding error ``e``, with ``a + b = s + e`` exactly (Knuth).

    Branch-free, so it vectorizes; XLA does not reassociate floating-point arithmetic, so the
    error terms survive compilation.
    """
    s = a + b
    b_part = s - a
    a_part = s - b_part
    return s, (a - a_part) + (b - b_part)


def _compensated_sum(
    x: jax.Array, lo: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Sum over the last axis as an unevaluated pair ``(hi, lo)``, ``sum ~= hi + lo``.

    Pairwise: the first and second halves are added elementwise with :func:`_two_sum`; the
    rounding errors are added to ``lo`` (which may carry earlier errors of the same terms), and
    ``lo`` is halved alongside in plain arithmetic. ``hi`` is the plain pairwise sum and the
    errors it made are all in ``lo``, so ``hi + lo`` is as accurate as a pairwise sum in twice
    the precision. The last axis must not be empty.
    """
    if lo is None:
        lo = jnp.zeros_like(x)
    while x.shape[-1] > 1:
        size = x.shape[-1]
        half = size // 2
        hi, err = _two_sum(x[..., :half], x[..., half : 2 * half])
        err = lo[..., :half] + lo[..., half : 2 * half] + err
        if size % 2:  # an odd element waits for the next level
            hi = jnp.concatenate([hi, x[..., -1:]], axis=-1)
            err = jnp.concatenate([err, lo[..., -1:]], axis=-1)
        x, lo = hi, err
    return x[..., 0], lo[..., 0]


#: Independent running sums per array in the first pass of :func:`_compensated_sums`.
_RUNS = 1024


def _two_sum_reducer(left: tuple, right: tuple) -> tuple:
    """Reducer on k (hi, lo) pairs, laid out (hi_1..hi_k, lo_1..lo_k): the hi parts are added
    with :func:`_two_sum` and the errors go to lo. Valid in any order XLA chooses: hi + lo stays
    the exact sum of the terms up to the plain rounding of the small lo sums."""
    k = len(left) // 2
    his, los = [], []
    for i in range(k):
        s, e = _two_sum(left[i], right[i])
        his.append(s)
        los.append(left[k + i] + right[k + i] + e)
    return (*his, *los)


def _compensated_sums(terms: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Compensated sums of k 1-D float32 arrays of one length: ``(hi[k], lo[k])``.

    One pass over memory: each array is cut into :data:`_RUNS` consecutive runs, which XLA's
    reduce sums with :func:`_two_sum_reducer`; the run totals and the few elements left over
    are then added by :func:`_compensated_sum`. The error is about eps |sum| plus
    (length / _RUNS) eps**2 sum |x_i| from the plain sums of the error terms.
    """
    length = terms[0].shape[0]
    runs = _RUNS if length >= 2 * _RUNS else 0
    main = length - length % runs if runs else 0
    his = [t[main:] for t in terms]
    los = [jnp.zeros_like(h) for h in his]
    if runs:
        zero = np.float32(0)
        blocks = [t[:main].reshape(runs, -1) for t in terms]
        out = jax.lax.reduce(
            (*blocks, *[jnp.zeros_like(b) for b in blocks]),
            (zero,) * (2 * len(terms)),
            _two_sum_reducer,
            (1,),
        )
        his = [jnp.concatenate([o, h]) for o, h in zip(out[: len(terms)], his)]
        los = [jnp.concatenate([o, lo]) for o, lo in zip(out[len(terms) :], los)]
    return _compensated_sum(jnp.stack(his), jnp.stack(los))


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0**k`` as float32 for integer k in [-126, 127], built from its exponent bits (exact,
    and far cheaper than ``ldexp``, which also handles subnormals)."""
    return jax.lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def _times_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x * 2**k`` for integer ``k`` (broadcast against x), exact unless the result underflows.

    Two factors, so that each stays a normal float32 for |k| up to 252; a larger negative k gives
    0, which only ever scales terms too small to matter.
    """
    k = jnp.clip(k.astype(jnp.int32), -252, 252)
    half = k // 2
    return x * _pow2(half) * _pow2(k - half)


def _exponent(x: jax.Array) -> jax.Array:
    """Integer e with ``max|x|`` in ``[2**(e-1), 2**e)``; 0 for a zero or non-finite maximum, so
    that NaN and Inf reach the sums unchanged and propagate into the coefficients."""
    top = jnp.max(jnp.abs(x))
    _, e = jnp.frexp(top)
    return jnp.where(jnp.isfinite(top) & (top > 0), e, 0).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Partial dot products, their totals over devices, and the coefficients


class _Float64Sums:
    """Accumulation in float64 (x64 mode): the partials are ``[a.b, |a|^2, |b|^2]``."""

    guard = ZERO_GUARD

    @staticmethod
    def partials(a: jax.Array, b: jax.Array) -> jax.Array:
        a = a.reshape(-1).astype(jnp.float64)
        b = b.reshape(-1).astype(jnp.float64)
        return jnp.stack([jnp.sum(a * b), jnp.sum(a * a), jnp.sum(b * b)])

    @staticmethod
    def totals(parts: jax.Array, axis: int) -> jax.Array:
        """Sum of the devices' partials along ``axis``: ``[..., 3]``."""
        return jnp.sum(parts, axis=axis)

    @classmethod
    def coefficients(cls, totals: jax.Array) -> tuple[jax.Array, jax.Array]:
        dot, aa, bb = totals[..., 0], totals[..., 1], totals[..., 2]
        ca = jnp.where(aa < cls.guard, 1.0, 1.0 - dot / (2.0 * aa))
        cb = jnp.where(bb < cls.guard, 1.0, 1.0 - dot / (2.0 * bb))
        return ca, cb


class _Float32Sums:
    """Accumulation in float32 with compensated sums (x64 off).

    A device scales its pieces of a and b by 2**-ea and 2**-eb (their largest elements in
    [0.5, 1)) and reports ``[hi(a.b, |a|^2, |b|^2), lo(...), ea, eb]``: the scaled sums as
    hi + lo pairs and the exponents, so that no square overflows or underflows.
    """

    # A nonzero scaled vector has a squared norm >= 1/4; a zero one has exactly 0.
    guard = float(np.finfo(np.float32).tiny)

    @staticmethod
    def partials(a: jax.Array, b: jax.Array) -> jax.Array:
        a = a.reshape(-1).astype(jnp.float32)
        b = b.reshape(-1).astype(jnp.float32)
        ea, eb = _exponent(a), _exponent(b)
        a, b = _times_pow2(a, -ea), _times_pow2(b, -eb)
        hi, lo = _compensated_sums([a * b, a * a, b * b])
        return jnp.concatenate([hi, lo, jnp.stack([ea, eb]).astype(jnp.float32)])

    @staticmethod
    def totals(parts: jax.Array, axis: int) -> jax.Array:
        """Compensated sum of the devices' partials along ``axis``, rescaled to the largest
        exponents: ``[..., 4]`` = scaled ``a.b, |a|^2, |b|^2`` and ``eb - ea``."""
        ea, eb = parts[..., 6], parts[..., 7]
        top_a = jnp.max(ea, axis=axis, keepdims=True)
        top_b = jnp.max(eb, axis=axis, keepdims=True)
        shift = jnp.stack([ea + eb - top_a - top_b, 2 * (ea - top_a), 2 * (eb - top_b)], axis=-1)
        hi = _times_pow2(parts[..., 0:3], shift)
        lo = _times_pow2(parts[..., 3:6], shift)
        hi, lo = _compensated_sum(jnp.moveaxis(hi, axis, -1), jnp.moveaxis(lo, axis, -1))
        scale = jnp.squeeze(top_b - top_a, axis)
        return jnp.concatenate([hi + lo, scale[..., None]], axis=-1)

    @classmethod
    def coefficients(cls, totals: jax.Array) -> tuple[jax.Array, jax.Array]:
        # a.b / |a|^2 = 2**(eb-ea) * (scaled a.b) / (scaled |a|^2), and the other way for b.
        dot, aa, bb, shift = totals[..., 0], totals[..., 1], totals[..., 2], totals[..., 3]
        ca = jnp.where(aa < cls.guard, 1.0, 1.0 - _times_pow2(dot / (2.0 * aa), shift))
        cb = jnp.where(bb < cls.guard, 1.0, 1.0 - _times_pow2(dot / (2.0 * bb), -shift))
        return ca, cb


def _sums() -> type[_Float64Sums] | type[_Float32Sums]:
    return _Float64Sums if accumulation_dtype() == np.float64 else _Float32Sums


def _combine(a: jax.Array, b: jax.Array, ca: jax.Array, cb: jax.Array) -> jax.Array:
    """``ca * a + cb * b`` rounded once to a's dtype, as :func:`adasum.ops.segment_combine` does:
    computed in float32 for float16 and bfloat16 leaves and in float64 for float32 and float64
    leaves, except that without x64 float32 leaves are combined in float32 (no float64 there)."""
    dtype = a.dtype
    compute = jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else accumulation_dtype()
    a, b = a.astype(compute), b.astype(compute)
    x, y = ca.astype(compute) * a, cb.astype(compute) * b
    # XLA lets LLVM contract x + y into a fused multiply-add (one rounding fewer than the
    # reference). Selecting between each product and its operand (they differ only where the
    # operand is NaN, and then both are NaN) hides the multiplication from the contraction.
    x = jnp.where(a == a, x, a)
    y = jnp.where(b == b, y, b)
    return (x + y).astype(dtype)


# --------------------------------------------------------------------------------------------
# The collective


def _check_leaf(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"Adasum needs float16, bfloat16, float32 or float64 leaves, got {x.dtype}"
        )
    return x


def _to_rows(x: jax.Array, p: int) -> jax.Array:
    """The leaf flattened, zero-padded and viewed as ``[p, ceil(size / p)]``; zeros add nothing
    to the dot products."""
    width = -(-x.size // p)
    flat = jnp.pad(x.reshape(-1), (0, p * width - x.size))
    return flat.reshape(p, width)


def _from_rows(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    size = int(np.prod(shape, dtype=np.int64))
    return rows.reshape(-1)[:size].reshape(shape)


def _tree_distances(n: int) -> list[int]:
    """Leaf distance of each tree stage of :func:`adasum._order.schedule` (1, 2, 4, ...)."""
    stages = order.schedule(n)[1 if n != order.largest_power_of_two(n) else 0 :]
    firsts = [stage[0] for stage in stages]
    return [order.leaf_index(right, n) - order.leaf_index(left, n) for left, right in firsts]


def _final_row(leaf: int, distances: Sequence[int]) -> int:
    """The row a leaf device holds after the reduce-scatter: at distance d it keeps the upper
    half of its rows when it is the upper partner (bit d of its leaf index is set)."""
    row, rows = 0, 2 * distances[-1] if distances else 1
    for d in distances:
        rows //= 2
        if leaf & d:
            row += rows
    return row


def _fold(
    xs: list[jax.Array], axis_name: Hashable, n: int, rank: jax.Array, sums
) -> list[jax.Array]:
    """Stage 1 of the order when N is not a power of two: rank 2i combines with rank 2i+1."""
    pairs = order.schedule(n)[0]
    received = jax.lax.ppermute(xs, axis_name, perm=[(right, left) for left, right in pairs])
    parts = jnp.stack([sums.partials(x, y) for x, y in zip(xs, received)])
    ca, cb = sums.coefficients(sums.totals(parts[None], axis=0))
    # Every device computes (SPMD); only the left member of a pair keeps the result.
    is_left = (rank < 2 * len(pairs)) & (rank % 2 == 0)
    return [
        jnp.where(is_left, _combine(x, y, ca[i], cb[i]), x)
        for i, (x, y) in enumerate(zip(xs, received))
    ]


def _reduce_scatter(
    blocks: list[jax.Array], axis_name: Hashable, n: int, rank: jax.Array, sums
) -> list[jax.Array]:
    """The tree stages by vector halving: returns each leaf device's one row of the result."""
    leaf_ranks = order.leaves(n)
    p = len(leaf_ranks)
    leaf = jnp.asarray([order.leaf_index(r, n) or 0 for r in range(n)], jnp.int32)[rank]
    for d in _tree_distances(n):
        half = blocks[0].shape[0] // 2
        upper = (leaf // d) % 2  # 1: this device holds pieces of the right operand
        is_upper = upper == 1
        keep = [jax.lax.dynamic_slice_in_dim(x, upper * half, half) for x in blocks]
        send = [jax.lax.dynamic_slice_in_dim(x, (1 - upper) * half, half) for x in blocks]
        perm = [(leaf_ranks[j], leaf_ranks[j ^ d]) for j in range(p)]
        received = jax.lax.ppermute(send, axis_name, perm=perm)
        a = [jnp.where(is_upper, r, k) for k, r in zip(keep, received)]
        b = [jnp.where(is_upper, k, r) for k, r in zip(keep, received)]
        parts = jnp.stack([sums.partials(x, y) for x, y in zip(a, b)])
        # Every device sums the same gathered numbers in the same order: equal coefficients.
        gathered = jax.lax.all_gather(parts, axis_name)[np.asarray(leaf_ranks)]
        group = 2 * d
        totals = sums.totals(gathered.reshape(p // group, group, *parts.shape), axis=1)
        ca, cb = sums.coefficients(totals[leaf // group])
        blocks = [_combine(x, y, ca[i], cb[i]) for i, (x, y) in enumerate(zip(a, b))]
    return blocks


def _all_gather_rows(blocks: list[jax.Array], axis_name: Hashable, n: int) -> list[jax.Array]:
    """Every device receives every row; the result is invariant over the axis (rule 5)."""
    leaf_ranks = order.leaves(n)
    distances = _tree_distances(n)
    holder = [0] * len(leaf_ranks)
    for j, r in enumerate(leaf_ranks):
        holder[_final_row(j, distances)] = r
    gathered = jax.lax.all_gather(blocks, axis_name, to="invarying")
    return [g[np.asarray(holder), 0] for g in gathered]


def all_reduce(tree: Any, axis_name: Hashable) -> Any:
    """Adasum of every leaf of ``tree`` over the devices of ``axis_name``.

    Call it inside ``jax.shard_map`` or ``jax.pmap`` (under ``jit`` or not). Each leaf is one
    layer (rule 1); leaf x of device r is ``x_r``, and every device receives
    ``Adasum(x_0, ..., x_{N-1})`` combined in the order of :func:`adasum._order.schedule`, with
    identical bits on every device. Leaves must have the same shape and dtype on every device;
    supported dtypes are float16, bfloat16, float32 and float64. Empty leaves are returned as
    they are; one device is the identity. See the module docstring for the algorithm and the
    accumulation precision.

    Raises TypeError for a leaf of another dtype.
    """
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [_check_leaf(x) for x in leaves]
    n = jax.lax.axis_size(axis_name)
    work = [i for i, x in enumerate(leaves) if x.size]
    if n == 1 or not work:
        return jax.tree.unflatten(treedef, leaves)
    sums = _sums()
    rank = jax.lax.axis_index(axis_name)
    xs = [leaves[i] for i in work]
    if n != order.largest_power_of_two(n):
        xs = _fold(xs, axis_name, n, rank, sums)
    p = order.largest_power_of_two(n)
    blocks = _reduce_scatter([_to_rows(x, p) for x in xs], axis_name, n, rank, sums)
    rows = _all_gather_rows(blocks, axis_name, n)
    for i, x, r in zip(work, xs, rows):
        leaves[i] = _from_rows(r, x.shape)
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------
# Optax


def adasum(inner: Any, axis_name: Hashable) -> Any:
    """Delta mode: run ``inner`` (an Optax transformation) on each device's own gradients and
    combine the resulting updates with :func:`all_reduce`.

    An Optax update is exactly the parameter delta ``new - old``, so with identical parameters
    on every device, ``optax.apply_updates(params, updates)`` sets ``params = old +
    Adasum(deltas)`` everywhere. The inner state (Adam's moments, say) is updated from the local
    gradients only and differs between devices: keep it per device (for ``shard_map``, with a
    leading axis sharded over ``axis_name``). Use this inside ``shard_map`` or ``pmap``. Extra
    arguments of ``update`` are passed to ``inner``.
    """
    import optax

    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra_args):
        deltas, state = inner.update(updates, state, params, **extra_args)
        return all_reduce(deltas, axis_name), state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def adasum_gradients(axis_name: Hashable) -> Any:
    """Gradient mode: replace the gradients by their Adasum over ``axis_name``.

    Chain it before the optimizer, e.g. ``optax.chain(adasum_gradients("data"), optax.sgd(lr))``;
    the optimizer then sees identical gradients on every device, so its state stays identical.
    Stateless. Fine for SGD and momentum; for Adam or LAMB use :func:`adasum` (delta mode).
    """
    import optax

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return all_reduce(updates, axis_name), state

    return optax.GradientTransformation(init, update)
