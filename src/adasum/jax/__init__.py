r"""Adasum for JAX: a collective for ``jax.shard_map`` and ``jax.pmap``, and Optax transformations.

    from adasum.jax import all_reduce, adasum_deltas, adasum_gradients

    all_reduce(tree, axis_name)          inside shard_map/pmap: every leaf replaced by the Adasum
                                         of that leaf over the devices of ``axis_name``
    adasum_deltas(inner, axis_name)      Optax, delta mode: the inner optimizer's per-device
                                         updates (deltas) are replaced by their Adasum; its state
                                         stays per device
    adasum_gradients(axis_name)          Optax, gradient mode: the gradients are replaced by their
                                         Adasum, to be chained before SGD or momentum

The semantics are those of :mod:`adasum._ops` and :mod:`adasum._order` (the contract, rules 1-6):
per leaf,

.. math::

    \mathrm{Adasum}(a, b) = \Bigl(1 - \frac{a\cdot b}{2\lVert a\rVert^2}\Bigr) a
                          + \Bigl(1 - \frac{a\cdot b}{2\lVert b\rVert^2}\Bigr) b ,

a squared norm below ``ZERO_GUARD`` gets the coefficient 1, the operator is applied to the N
devices' leaves in the order of :func:`adasum._order.schedule` for any N, and every device ends
with the same bits.

**Algorithm.** With p the largest power of two <= N and r = N - p:

1. *fold*: device 2i+1 sends its leaves to device 2i (i < r), which combines the pair.
2. *reduce-scatter* (vector halving, distance doubling) among the p leaf devices: each leaf is
   padded and viewed as p rows; at distance d = 1, 2, 4, ... a device keeps half of the rows it
   holds and swaps the other half with the leaf device d away (``ppermute``). Each device computes
   the per-leaf partial ``a.b, |a|^2, |b|^2`` over its rows; these few scalars are exchanged with
   ``all_gather`` and summed, in one fixed order, over the 2d devices that hold pieces of the same
   two vectors, so all of them derive the same coefficients. After log2(p) levels leaf device j
   holds row j of the result.
3. *all-gather*: the rows are gathered on every device (the extra devices of the fold included).

Bytes sent per device are about 2 S (p-1)/p for S bytes of leaves, as for a ring allreduce; the
scalar exchanges add log2(p) tiny all-gathers. Each row of the result is computed on exactly one
device and then copied, so every device holds identical bits (rule 5); the result is typed as
invariant over ``axis_name``, like the result of ``psum``.

**Accumulation precision** (the dot products and squared norms behind the coefficients):

- x64 enabled (``jax_enable_x64``): float64, as in the PyTorch reference. Products of float32,
  float16 and bfloat16 elements are exact in float64; the sums are plain float64 sums.
- x64 disabled (JAX's default): float32 with a *compensated* sum. The products are added with
  Knuth's TwoSum, whose exact rounding errors are summed alongside: in passes that add 8
  consecutive pieces of the vector element by element (independent offsets, not one chain;
  each pass shrinks the data 8 times), then by a pairwise cascade of the same kind, so that
  ``|computed - sum| <= eps |sum| + (D eps)**2 sum |x_i|`` with eps = 2**-24 and D about
  8 log8(n) (60 for n = 2**22): about one rounding of the result for any practical length. Each product is itself rounded once to
  float32 (exact for float16 and bfloat16 elements). To keep squares of large or tiny float32
  values from overflowing or underflowing, each device scales a and b by powers of two (exact)
  that bring their largest element into [0.5, 1), and the scales are undone in the coefficients.
  A float32 vector that is not zero has a squared norm of at least 2e-90, far above
  ``ZERO_GUARD``, so in this mode the zero guard means "all elements are zero" exactly.

The combination ``ca * a + cb * b`` is computed as in :func:`adasum._ops.segment_combine` (float32
for float16 and bfloat16 leaves, float64 for float32 and float64 leaves; without x64, float32 for
float32 leaves), two products and a sum without fused multiply-add, then rounded once to the
leaf's dtype. With x64 enabled, the result therefore equals the PyTorch reference bit for bit
unless a float64 sum lands differently on a rounding boundary (its summation order differs).

**Modules**, each calling only the ones below it: ``_optax`` (the two Optax transformations),
``_collective`` (:func:`all_reduce`: fold, reduce-scatter, all-gather), ``_operator`` (the
operator on one leaf: partial sums, coefficients, the combination) and ``_sums`` (exact and
compensated float32 sums, power-of-two scaling).
"""

from adasum.jax._collective import all_reduce
from adasum.jax._operator import SUPPORTED_DTYPES, accumulation_dtype
from adasum.jax._optax import adasum_deltas, adasum_gradients

__all__ = ["all_reduce", "adasum_deltas", "adasum_gradients", "accumulation_dtype", "SUPPORTED_DTYPES"]
