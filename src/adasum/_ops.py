r"""The Adasum operator and the per-layer arithmetic every backend shares.

For two vectors a and b (one layer each),

.. math::

    \mathrm{Adasum}(a, b) = \Bigl(1 - \frac{a\cdot b}{2\lVert a\rVert^2}\Bigr) a
                          + \Bigl(1 - \frac{a\cdot b}{2\lVert b\rVert^2}\Bigr) b .

Orthogonal vectors are summed, parallel ones averaged. a.b, |a|^2 and |b|^2 are accumulated
in float64 whatever the tensors' dtype; a squared norm below sqrt(float64 tiny) counts as zero
and gets the coefficient 1, so a zero vector leaves the other unchanged. The combination
``ca * a + cb * b`` is computed in float64 for float32 and float64 tensors and in float32 for
float16 and bfloat16, then rounded once to the tensors' dtype: two multiplications and an
addition, no fused multiply-add, on every device, so results do not depend on which kernel ran.

On CPU the C kernels (``_kernels.c``) compute both steps; CUDA buffers take the fused Triton
kernels of :mod:`adasum._triton` where Triton is installed. Other buffers (CUDA without Triton,
CPU when the C kernels are not built) take :mod:`adasum._chunked`: the same arithmetic in
PyTorch ops, chunk by chunk, in at most half a buffer of extra memory.

The building blocks here work on *segmented* flat buffers: a 1-D tensor that holds several
layers end to end, split by an int64 offsets tensor ``[0, n0, n0 + n1, ...]``. This is how the
reducer, the collective and the DDP hook apply the operator per layer with a few calls.

NaN and Inf propagate as in a sum: a non-finite element makes that layer's coefficients NaN,
so the combined layer is non-finite and a loss scaler sees the overflow.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adasum import _chunked, _triton

_kernels: Any
try:
    from adasum import _kernels  # type: ignore[no-redef]  # a C extension, no stubs
except ImportError:  # built without a C compiler: PyTorch ops do the same arithmetic
    _kernels = None

__all__ = [
    "SUPPORTED_DTYPES",
    "ZERO_GUARD",
    "check_dtype",
    "combine",
    "coefficients",
    "segment_partials",
    "segment_combine",
    "offsets_of",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Squared norms below this (sqrt of float64's smallest normal, about 1.5e-154) count as zero.
ZERO_GUARD = math.sqrt(torch.finfo(torch.float64).tiny)

_KERNEL_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def unsupported_dtype(what: str, dtype: object, items: str = "tensors") -> str:
    """The one text for a dtype Adasum refuses (here, in the validation, in JAX):
    ``tensor 2 is int64; Adasum needs float16, bfloat16, float32 or float64 tensors``."""
    return f"{what} is {str(dtype).removeprefix('torch.')}; Adasum needs float16, bfloat16, float32 or float64 {items}"


def check_dtype(tensor: torch.Tensor) -> None:
    """Raise TypeError unless ``tensor`` has a floating dtype Adasum supports."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(unsupported_dtype("the tensor", tensor.dtype))


def offsets_of(numels: list[int]) -> torch.Tensor:
    """int64 offsets ``[0, n0, n0 + n1, ...]`` of layers with the given element counts."""
    out = torch.zeros(len(numels) + 1, dtype=torch.int64)
    if numels:
        torch.cumsum(torch.tensor(numels, dtype=torch.int64), 0, out=out[1:])
    return out


def _use_kernels(*tensors: torch.Tensor) -> bool:
    return _kernels is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def segment_partials(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment float64 ``[a.b, |a|^2, |b|^2]`` of two flat buffers, as a ``[3, nseg]`` tensor
    on the buffers' device. ``offsets`` is a CPU int64 tensor (see :func:`offsets_of`)."""
    nseg = offsets.numel() - 1
    if _use_kernels(a, b):
        out = torch.empty(3, nseg, dtype=torch.float64)
        _kernels.segment_partials(
            a.data_ptr(), b.data_ptr(), _KERNEL_CODE[a.dtype], offsets.data_ptr(), nseg, out.data_ptr(),
            torch.get_num_threads(),
        )
        return out
    if _triton.available(a, b):
        return _triton.partials(a, b, offsets)
    return _chunked.partials(a, b, offsets)


def coefficients(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 coefficients ``(ca, cb)`` from ``[a.b, |a|^2, |b|^2]`` partials (``[3, ...]``)."""
    dot, aa, bb = partials[0], partials[1], partials[2]
    one = torch.ones((), dtype=torch.float64, device=partials.device)
    # A NaN norm fails the comparison and keeps its NaN coefficient, so NaN propagates.
    ca = torch.where(aa < ZERO_GUARD, one, 1.0 - dot / (2.0 * aa))
    cb = torch.where(bb < ZERO_GUARD, one, 1.0 - dot / (2.0 * bb))
    return ca, cb


def segment_combine(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    offsets: torch.Tensor,
    ca: torch.Tensor,
    cb: torch.Tensor,
) -> None:
    """``out = ca[s] * a + cb[s] * b`` on every segment s; ``out`` may be ``a`` or ``b``."""
    nseg = offsets.numel() - 1
    if _use_kernels(a, b, out):
        ca, cb = ca.cpu().contiguous(), cb.cpu().contiguous()
        _kernels.segment_combine(
            a.data_ptr(),
            b.data_ptr(),
            out.data_ptr(),
            _KERNEL_CODE[a.dtype],
            offsets.data_ptr(),
            nseg,
            ca.data_ptr(),
            cb.data_ptr(),
            torch.get_num_threads(),
        )
        return
    if _triton.available(a, b, out):
        _triton.combine(a, b, out, offsets, ca, cb)
        return
    _chunked.combine(a, b, out, offsets, ca, cb)


def combine(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Adasum of two tensors treated as one layer; the result has their dtype and shape.

    ``out``, if given, is a contiguous tensor of that shape and dtype to write to (it may be
    ``a`` or ``b``). Raises TypeError for integer, bool or complex tensors and ValueError when
    the shapes, dtypes or devices differ.
    """
    check_dtype(a)
    check_dtype(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        raise ValueError(
            "adasum.combine needs tensors of one shape, dtype and device, got "
            f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}"
        )
    flat_a, flat_b = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    offsets = offsets_of([flat_a.numel()])
    ca, cb = coefficients(segment_partials(flat_a, flat_b, offsets))
    if out is None:
        out = torch.empty_like(a, memory_format=torch.contiguous_format)
    elif out.shape != a.shape or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of the inputs' shape and dtype")
    segment_combine(flat_a, flat_b, out.view(-1), offsets, ca, cb)
    return out
