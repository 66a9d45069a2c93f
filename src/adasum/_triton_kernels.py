"""The Triton source of :mod:`adasum._triton`'s two kernels (see there for the arithmetic).

Imported only when a CUDA buffer first needs them: Triton loads its own LLVM, and a process that
also holds TensorFlow's aborts when both register LLVM's command-line options, so merely
importing adasum must never import Triton.
"""

import triton
import triton.language as tl

__all__ = ["partials_kernel", "combine_kernel"]


@triton.jit
def _to_bfloat16(z):
    # Round to nearest, ties to even, NaN kept quiet, in integer arithmetic: what the C
    # kernels do. Triton's own conversion may truncate (its interpreter does).
    u = z.to(tl.uint32, bitcast=True)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(nan, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def partials_kernel(a_ptr, b_ptr, starts_ptr, lengths_ptr, sums_ptr, nblocks, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    start = tl.load(starts_ptr + k)
    inside = tl.arange(0, BLOCK) < tl.load(lengths_ptr + k)
    x = tl.load(a_ptr + start + tl.arange(0, BLOCK), mask=inside, other=0.0).to(tl.float64)
    y = tl.load(b_ptr + start + tl.arange(0, BLOCK), mask=inside, other=0.0).to(tl.float64)
    tl.store(sums_ptr + k, tl.sum(x * y, axis=0))
    tl.store(sums_ptr + nblocks + k, tl.sum(x * x, axis=0))
    tl.store(sums_ptr + 2 * nblocks + k, tl.sum(y * y, axis=0))


@triton.jit
def combine_kernel(
    a_ptr, b_ptr, out_ptr, ca_ptr, cb_ptr, starts_ptr, lengths_ptr, segment_ptr,
    BLOCK: tl.constexpr, WIDE: tl.constexpr, BFLOAT16: tl.constexpr,
):
    k = tl.program_id(0)
    start = tl.load(starts_ptr + k)
    s = tl.load(segment_ptr + k)
    inside = tl.arange(0, BLOCK) < tl.load(lengths_ptr + k)
    where = start + tl.arange(0, BLOCK)
    # The compute dtype: float64 for float32 and float64 buffers (WIDE), float32 for 16-bit ones.
    if WIDE:
        ca = tl.load(ca_ptr + s)
        cb = tl.load(cb_ptr + s)
        x = tl.load(a_ptr + where, mask=inside).to(tl.float64)
        y = tl.load(b_ptr + where, mask=inside).to(tl.float64)
    else:
        ca = tl.load(ca_ptr + s).to(tl.float32)
        cb = tl.load(cb_ptr + s).to(tl.float32)
        x = tl.load(a_ptr + where, mask=inside).to(tl.float32)
        y = tl.load(b_ptr + where, mask=inside).to(tl.float32)
    z = ca * x + cb * y
    if BFLOAT16:
        z = _to_bfloat16(z)
    tl.store(out_ptr + where, z.to(out_ptr.dtype.element_ty), mask=inside)
