"""The operator's arithmetic as fused Triton kernels, for CUDA buffers when Triton is installed.

:mod:`adasum._chunked` does the same arithmetic in PyTorch ops: several kernel launches per
chunk and float64 working copies of each chunk. Here each quantity is one launch over the whole
buffer, one program per block, that reads each operand once and keeps the float64 values in
registers, so the extra memory is the bookkeeping alone (a few numbers per block: under 1% of
a float32 buffer whose layers hold a block or more) and the combination reads and writes what
``torch.add`` does.

Blocks are :mod:`adasum._chunked`'s (at most :data:`~adasum._chunked.BLOCK` elements counted
from a segment's start, never straddling two segments).

Partial sums: each program sums its block's float64 products ``[a.b, |a|^2, |b|^2]`` (Triton's
reduction tree: the same bits on every call of the same kernel on the same GPU); a segment's
total is its block sums added in block order, as in :mod:`adasum._chunked`. Results agree with
the C kernels to float64 rounding.

Combination: ``ca * a + cb * b`` in the compute dtype (:func:`adasum._chunked.compute_dtype`),
two multiplications and an addition, rounded once to the buffer's dtype. The kernels are
compiled with floating-point contraction off (``enable_fp_fusion=False``), so no fused
multiply-add changes the rounding: bit for bit what the C kernels compute.

With ``TRITON_INTERPRET=1`` set before the kernels are first used, Triton runs them on the
CPU in NumPy; the tests check them against the C kernels that way on machines without a GPU,
and compile them for Ampere and Hopper GPUs (Triton carries the NVIDIA assembler) to check that
the combination's machine code has no fused multiply-add.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from adasum import _chunked

#: Whether Triton is installed. It is imported only when a CUDA buffer needs the kernels
#: (:mod:`adasum._triton_kernels`), never by ``import adasum``.
INSTALLED = importlib.util.find_spec("triton") is not None

__all__ = ["OPTIONS", "available", "partials", "combine"]

#: Compiler options of every launch: no floating-point contraction (a fused multiply-add would
#: round differently from the C kernels), and 8 warps, whose 256 threads hold a 4096-element
#: block as 16 elements each, so the float64 operands stay in registers.
OPTIONS = {"enable_fp_fusion": False, "num_warps": 8}


def available(*tensors: torch.Tensor) -> bool:
    """Whether these kernels serve the tensors: Triton is installed and every tensor is a
    contiguous CUDA tensor."""
    return INSTALLED and all(t.is_cuda and t.is_contiguous() for t in tensors)


@functools.lru_cache(maxsize=64)
def _blocks(offsets: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(starts, lengths, segment, counts)`` of the blocks of a layout, on ``device``: the
    element where each block starts, its length, its segment, and each segment's number of
    blocks. Cached per layout, so a training loop copies them to the device once."""
    blocks = _chunked.Blocks(torch.tensor(offsets, dtype=torch.int64), chunk=max(offsets[-1], _chunked.BLOCK))
    return tuple(t.to(device) for t in (blocks.starts, blocks.lengths, blocks.segment, blocks.counts))


def partials(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment float64 ``[a.b, |a|^2, |b|^2]`` as a ``[3, nseg]`` tensor on a's device."""
    starts, lengths, _, counts = _blocks(tuple(offsets.tolist()), a.device)
    nblocks, nseg = starts.numel(), offsets.numel() - 1
    sums = torch.empty(3, nblocks, dtype=torch.float64, device=a.device)
    if nblocks:
        from adasum._triton_kernels import partials_kernel

        partials_kernel[(nblocks,)](
            a, b, starts, lengths, sums, nblocks, BLOCK=_chunked.BLOCK, **OPTIONS
        )
    # A segment's blocks are adjacent: its total is their sum in block order (0 if it has none).
    return torch.segment_reduce(sums, "sum", lengths=counts.expand(3, nseg).contiguous(), axis=1, unsafe=True)


def combine(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor
) -> None:
    """``out = ca[s] * a + cb[s] * b`` on every segment s; ``out`` may be ``a`` or ``b`` (a
    program reads its whole block before it writes)."""
    starts, lengths, segment, _ = _blocks(tuple(offsets.tolist()), a.device)
    if starts.numel():
        ca, cb = (c.to(device=a.device, dtype=torch.float64).contiguous() for c in (ca, cb))
        from adasum._triton_kernels import combine_kernel

        combine_kernel[(starts.numel(),)](
            a, b, out, ca, cb, starts, lengths, segment, BLOCK=_chunked.BLOCK,
            WIDE=_chunked.compute_dtype(a.dtype) == torch.float64, BFLOAT16=a.dtype == torch.bfloat16,
            **OPTIONS,
        )
