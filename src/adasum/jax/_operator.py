"""The Adasum operator on one leaf: partial sums, their totals, the coefficients, the combination.

For vectors a and b (one leaf of two devices, or of two partial results) the operator is
``ca * a + cb * b`` with ``ca = 1 - a.b / (2 |a|^2)`` and ``cb = 1 - a.b / (2 |b|^2)``, and a
coefficient of 1 where the squared norm is below the zero guard. The collective splits a and b
over devices, so the sums behind the coefficients come in three steps, each of which depends on
the accumulation precision (:class:`Float64Sums` with x64, :class:`Float32Sums` without):

1. ``partials(a, b)``: one device's share of ``a.b, |a|^2, |b|^2`` (a few numbers per leaf);
2. ``totals(parts, axis)``: the devices' shares added in one fixed order;
3. ``coefficients(totals)``: ``(ca, cb)``.

Then :func:`combine` forms ``ca * a + cb * b`` on each device's piece.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adasum._ops import ZERO_GUARD, unsupported_dtype
from adasum.jax._sums import (
    compensated_sum,
    compensated_sums,
    exponent,
    rounded_product,
    times_pow2,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "Float32Sums",
    "Float64Sums",
    "Sums",
    "accumulation_dtype",
    "active_sums",
    "check_leaf",
    "combine",
]

SUPPORTED_DTYPES = tuple(
    np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
)


def accumulation_dtype() -> np.dtype:
    """float64 when JAX's x64 mode is on, float32 (with compensated sums) otherwise."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def check_leaf(x: Any) -> jax.Array:
    """``x`` as an array; TypeError unless its dtype is one of :data:`SUPPORTED_DTYPES`."""
    x = jnp.asarray(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(unsupported_dtype("a leaf", x.dtype, "leaves"))
    return x


class Float64Sums:
    """Accumulation in float64 (x64 mode): the partials are ``[a.b, |a|^2, |b|^2]``."""

    guard = ZERO_GUARD
    #: The partials' order with a and b exchanged.
    swap = (0, 2, 1)

    @staticmethod
    def partials(a: jax.Array, b: jax.Array) -> jax.Array:
        """``[a.b, |a|^2, |b|^2]`` over this device's pieces of a and b."""
        a = a.reshape(-1).astype(jnp.float64)
        b = b.reshape(-1).astype(jnp.float64)
        return jnp.stack([jnp.sum(a * b), jnp.sum(a * a), jnp.sum(b * b)])

    @staticmethod
    def totals(parts: jax.Array, axis: int) -> jax.Array:
        """Sum of the devices' partials along ``axis``: ``[..., 3]``."""
        return jnp.sum(parts, axis=axis)

    @classmethod
    def coefficients(cls, totals: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``ca = 1 - a.b / (2 |a|^2)`` and ``cb = 1 - a.b / (2 |b|^2)``; 1 below the guard."""
        dot, aa, bb = totals[..., 0], totals[..., 1], totals[..., 2]
        ca = jnp.where(aa < cls.guard, 1.0, 1.0 - dot / (2.0 * aa))
        cb = jnp.where(bb < cls.guard, 1.0, 1.0 - dot / (2.0 * bb))
        return ca, cb


class Float32Sums:
    """Accumulation in float32 with compensated sums (x64 off).

    A device scales its pieces of a and b by 2**-ea and 2**-eb (their largest elements in
    [0.5, 1)) and reports ``[hi(a.b, |a|^2, |b|^2), lo(...), ea, eb]``: the scaled sums as
    hi + lo pairs and the exponents, so that no square overflows or underflows.
    """

    # A nonzero scaled vector has a squared norm >= 1/4; a zero one has exactly 0.
    guard = float(np.finfo(np.float32).tiny)
    #: The partials' order with a and b exchanged.
    swap = (0, 2, 1, 3, 5, 4, 7, 6)

    @staticmethod
    def partials(a: jax.Array, b: jax.Array) -> jax.Array:
        """``[hi(a.b, |a|^2, |b|^2), lo(...), ea, eb]`` over this device's scaled pieces."""
        a = a.reshape(-1).astype(jnp.float32)
        b = b.reshape(-1).astype(jnp.float32)
        ea, eb = exponent(a), exponent(b)
        a, b = times_pow2(a, -ea), times_pow2(b, -eb)
        hi, lo = compensated_sums([rounded_product(a, b), rounded_product(a, a), rounded_product(b, b)])
        return jnp.concatenate([hi, lo, jnp.stack([ea, eb]).astype(jnp.float32)])

    @staticmethod
    def totals(parts: jax.Array, axis: int) -> jax.Array:
        """Compensated sum of the devices' partials along ``axis``, rescaled to the largest
        exponents: ``[..., 4]`` = scaled ``a.b, |a|^2, |b|^2`` and ``eb - ea``."""
        ea, eb = parts[..., 6], parts[..., 7]
        top_a = jnp.max(ea, axis=axis, keepdims=True)
        top_b = jnp.max(eb, axis=axis, keepdims=True)
        shift = jnp.stack([ea + eb - top_a - top_b, 2 * (ea - top_a), 2 * (eb - top_b)], axis=-1)
        hi = times_pow2(parts[..., 0:3], shift)
        lo = times_pow2(parts[..., 3:6], shift)
        hi, lo = compensated_sum(jnp.moveaxis(hi, axis, -1), jnp.moveaxis(lo, axis, -1))
        scale = jnp.squeeze(top_b - top_a, axis)
        return jnp.concatenate([hi + lo, scale[..., None]], axis=-1)

    @classmethod
    def coefficients(cls, totals: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The coefficients of :meth:`Float64Sums.coefficients`, with the scales undone."""
        # a.b / |a|^2 = 2**(eb-ea) * (scaled a.b) / (scaled |a|^2), and the other way for b.
        dot, aa, bb, shift = totals[..., 0], totals[..., 1], totals[..., 2], totals[..., 3]
        ca = jnp.where(aa < cls.guard, 1.0, 1.0 - times_pow2(dot / (2.0 * aa), shift))
        cb = jnp.where(bb < cls.guard, 1.0, 1.0 - times_pow2(dot / (2.0 * bb), -shift))
        return ca, cb


#: Either accumulation; both have ``partials``, ``swap``, ``totals`` and ``coefficients``.
Sums = type[Float64Sums] | type[Float32Sums]


def active_sums() -> Sums:
    """The accumulation that JAX's current x64 setting allows."""
    return Float64Sums if accumulation_dtype() == np.float64 else Float32Sums


def combine(a: jax.Array, b: jax.Array, ca: jax.Array, cb: jax.Array) -> jax.Array:
    """``ca * a + cb * b`` rounded once to a's dtype, as :func:`adasum._ops.segment_combine` does:
    computed in float32 for float16 and bfloat16 leaves and in float64 for float32 and float64
    leaves, except that without x64 float32 leaves are combined in float32 (no float64 there)."""
    dtype = a.dtype
    compute = jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else accumulation_dtype()
    a, b = a.astype(compute), b.astype(compute)
    # Rounded products: no fused multiply-add, whose single rounding the reference lacks.
    x, y = rounded_product(a, ca.astype(compute)), rounded_product(b, cb.astype(compute))
    return (x + y).astype(dtype)
