"""Exact and compensated float32 arithmetic: the sums behind the coefficients without x64.

Without x64 JAX has no float64, yet a dot product of a long float32 vector, summed plainly,
loses many digits to rounding. These helpers keep the rounding errors instead:

- :func:`compensated_sums` sums a few 1-D float32 arrays as ``hi + lo`` pairs, with an error of
  about one rounding of the result for any practical length, in passes over independent offsets;
- :func:`rounded_product` forms the products to sum, each rounded once (no fused multiply-add);
- :func:`compensated_sum` adds such pairs along an axis (the devices' partial sums);
- :func:`times_pow2` and :func:`exponent` scale by powers of two, exactly, so that squares of
  very large or very small float32 values neither overflow nor underflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["compensated_sum", "compensated_sums", "exponent", "rounded_product", "times_pow2"]

#: Consecutive pieces that one pass of :func:`compensated_sums` adds element by element.
_STREAMS = 8

def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = fl(a + b)`` and its rounding error ``e``, with ``a + b = s + e`` exactly (Knuth).

    Branch-free, so it vectorizes; XLA does not reassociate floating-point arithmetic, so the
    error terms survive compilation.
    """
    s = a + b
    b_part = s - a
    a_part = s - b_part
    return s, (a - a_part) + (b - b_part)


def compensated_sum(x: jax.Array, lo: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
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


def _fold_streams(
    his: list[jax.Array], los: list[jax.Array] | None
) -> tuple[list[jax.Array], list[jax.Array]]:
    """One pass of :func:`compensated_sums`: each array of length L, cut into :data:`_STREAMS`
    consecutive pieces of m = L // _STREAMS elements (a ``[_STREAMS, m]`` view), becomes the m
    compensated sums of its pieces' elements at the same offset, followed by the L mod
    _STREAMS elements left over; ``los`` (None: zeros) are the error terms carried so far.

    The sum runs over the major axis of the view, so the innermost loop runs over the m
    independent offsets, where a reduction along the minor axis with this reducer is one
    chain of dependent additions per output (several times slower on CPU).
    """
    length = his[0].shape[0]
    m = length // _STREAMS
    main = m * _STREAMS
    k = len(his)
    carried = los if los is not None else [jnp.zeros_like(h) for h in his]
    views = [x[:main].reshape(_STREAMS, m) for x in (*his, *carried)]
    zero = np.float32(0)
    out = jax.lax.reduce(tuple(views), (zero,) * (2 * k), _two_sum_reducer, (0,))
    return (
        [jnp.concatenate([o, h[main:]]) for o, h in zip(out[:k], his)],
        [jnp.concatenate([o, lo[main:]]) for o, lo in zip(out[k:], carried)],
    )


def compensated_sums(terms: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Compensated sums of k 1-D float32 arrays of one length n: ``(hi[k], lo[k])``.

    Passes of :func:`_fold_streams` shrink the arrays about :data:`_STREAMS` times each (the
    first one reads the terms once; the later ones read 1/_STREAMS of that, and less), then
    :func:`compensated_sum` adds what is left. Every addition of a term is a
    :func:`_two_sum`, and every error term passes through about D = _STREAMS * log(n) /
    log(_STREAMS) plain additions (about 60 for n = 2**22), so that, with eps = 2**-24,
    ``|hi + lo - sum| <= eps |sum| + (D eps)**2 sum |x_i|``: about one rounding of the sum.
    Terms that are products must be rounded ones (:func:`rounded_product`), not fused into
    the first addition.
    """
    his, los = list(terms), None
    while his[0].shape[0] >= 2 * _STREAMS:
        his, los = _fold_streams(his, los)
    hi = jnp.stack(his)
    return compensated_sum(hi, jnp.stack(los) if los is not None else jnp.zeros_like(hi))


def rounded_product(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x * y``, rounded to its dtype, as a value that no later addition absorbs.

    XLA lets LLVM contract a product and the sum it feeds into one fused multiply-add, a
    rounding fewer than written: TwoSum would then report a wrong error, and a combination
    would differ from the reference's. Selecting between the product and x (they differ only
    where x is NaN, and then both are NaN) hides the multiplication from the contraction.
    """
    return jnp.where(x == x, x * y, x)


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0**k`` as float32 for integer k in [-126, 127], built from its exponent bits (exact,
    and far cheaper than ``ldexp``, which also handles subnormals)."""
    return jax.lax.bitcast_convert_type((k + 127).astype(jnp.int32) << 23, jnp.float32)


def times_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x * 2**k`` for integer ``k`` (broadcast against x), exact unless the result underflows.

    Two factors, so that each stays a normal float32 for |k| up to 252; a larger negative k gives
    0, which only ever scales terms too small to matter.
    """
    k = jnp.clip(k.astype(jnp.int32), -252, 252)
    half = k // 2
    return x * _pow2(half) * _pow2(k - half)


#: The exponent :func:`exponent` gives a piece holding only zeros: below that of any float32,
#: so that such a piece never sets the common scale of the devices' pieces (their largest
#: exponent). With 0 there, the squared norms of pieces of 1e-20 beside a zero piece were
#: scaled by 2**-132, below the zero guard. The partial sums carry it as a float32, which holds
#: it, and the sums and differences of a few such exponents, exactly.
ZERO_EXPONENT = -1024


def exponent(x: jax.Array) -> jax.Array:
    """Integer e with ``max|x|`` in ``[2**(e-1), 2**e)``; :data:`ZERO_EXPONENT` for a zero
    maximum; 0 for a non-finite maximum, so that NaN and Inf reach the sums unchanged and
    propagate into the coefficients."""
    top = jnp.max(jnp.abs(x))
    _, e = jnp.frexp(top)
    e = jnp.where(top == 0, ZERO_EXPONENT, e)
    return jnp.where(jnp.isfinite(top), e, 0).astype(jnp.int32)
