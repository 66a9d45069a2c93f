"""The operator's arithmetic in PyTorch ops, chunk by chunk, in bounded extra memory.

This is the path of CUDA buffers, and of CPU buffers when the C kernels are not built. Done in
one pass over the whole buffer it would need float64 copies of both operands and of their
products (about 16 times a float32 buffer's bytes); here the buffer is cut into chunks and the
working buffers are sized to the chunk, so the extra memory stays at most half the buffer's
bytes (see :func:`chunk_elements` for the small-buffer floor).

Blocks and chunks. Each segment is cut into blocks of at most :data:`BLOCK` elements, counted
from the segment's start, so a block never straddles two segments. A chunk
is a run of whole blocks, so a chunk may split a large segment or hold many small ones, and its
bounds never depend on which device or thread computes it.

Partial sums: per block, the float64 products are summed by ``segment_reduce`` (one kernel call
per chunk and quantity, whatever the number of segments); the block sums of a segment are then
added in block order. Same input, same bits, on every call. The order differs from the C
kernels' (16 interleaved lanes per block) only by float64 rounding.

Combination: ``ca * a + cb * b`` with the operands and coefficients converted to the compute
dtype, two multiplications and an addition as separate ops (PyTorch never fuses them into a
fused multiply-add), rounded once to the buffer's dtype: bit for bit what the C kernels compute.
"""

from __future__ import annotations

import bisect

import torch

__all__ = ["BLOCK", "Blocks", "compute_dtype", "chunk_elements", "partials", "combine"]

#: Largest block, in elements, of a segment's partial sums; also the smallest chunk, which
#: sets the fixed floor of the extra memory for small buffers (:func:`chunk_elements`).
BLOCK = 4096
#: Largest chunk, in elements, per device type: on CPU a chunk's working buffers stay in cache;
#: on a GPU a larger chunk spreads each kernel launch's fixed cost over more elements.
_MAX_CHUNK = {"cpu": 1 << 16}
_MAX_CHUNK_ELSEWHERE = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``ca * a + cb * b`` is computed in: float32 for the 16-bit types (wider, and
    exact enough), float64 for float32 and float64 (a cancelling sum keeps float32's relative
    accuracy instead of losing it to two roundings in float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def chunk_elements(numel: int, itemsize: int, extra_per_element: int, device: torch.device) -> int:
    """Elements per chunk so that ``extra_per_element`` bytes per chunk element stay within 3/8
    of the buffer's ``numel * itemsize`` bytes, which leaves 1/8 below the half-buffer target
    for the bookkeeping (a few int64 and float64 numbers per block and per segment). A chunk
    holds at least one whole block, so a buffer under ``8/3 * BLOCK * extra_per_element`` bytes
    may use ``BLOCK * extra_per_element`` bytes (at most 128 KiB, and a little bookkeeping)
    instead of half its size."""
    budget = numel * itemsize * 3 // (8 * extra_per_element)
    return max(BLOCK, min(budget, _MAX_CHUNK.get(device.type, _MAX_CHUNK_ELSEWHERE)))


class Blocks:
    """The blocks of segmented buffers (host-side int64 bookkeeping, computed from the CPU
    ``offsets``) and their grouping into chunks of at most ``chunk`` elements."""

    def __init__(self, offsets: torch.Tensor, chunk: int) -> None:
        starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
        counts = (lengths + BLOCK - 1) // BLOCK  # blocks per segment; 0 for an empty one
        self.counts = counts
        self.segment = torch.repeat_interleave(torch.arange(lengths.numel()), counts)
        first = torch.cumsum(counts, 0) - counts
        within = torch.arange(self.segment.numel()) - first[self.segment]
        self.starts = starts[self.segment] + within * BLOCK
        self.ends = torch.minimum(self.starts + BLOCK, offsets[1:][self.segment])
        self.lengths = self.ends - self.starts
        #: ``(k0, k1, lo, hi)``: blocks ``[k0, k1)`` hold the elements ``[lo, hi)``.
        self.chunks = self._group(chunk)
        #: Elements in the longest chunk: the size of the working buffers.
        self.longest = max((hi - lo for _, _, lo, hi in self.chunks), default=0)

    def _group(self, chunk: int) -> list[tuple[int, int, int, int]]:
        # Each run as long as fits in ``chunk`` elements; a block is never longer than a chunk,
        # so every run holds at least one. Block ends never decrease, so bisection finds it.
        starts, ends = self.starts.tolist(), self.ends.tolist()
        runs, k0 = [], 0
        while k0 < len(starts):
            k1 = bisect.bisect_right(ends, starts[k0] + chunk, lo=k0 + 1)
            runs.append((k0, k1, starts[k0], ends[k1 - 1]))
            k0 = k1
        return runs


def partials(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-segment float64 ``[a.b, |a|^2, |b|^2]`` as a ``[3, nseg]`` tensor on a's device."""
    device, nseg = a.device, offsets.numel() - 1
    convert = a.dtype != torch.float64
    # Working memory per chunk element: the float64 product, and the float64 operands if the
    # buffers are not float64 already.
    per_element = 8 + (16 if convert else 0)
    blocks = Blocks(offsets, chunk_elements(a.numel(), a.element_size(), per_element, device))
    block_sums = torch.empty(3, blocks.segment.numel(), dtype=torch.float64, device=device)
    lengths = blocks.lengths.to(device)
    product = torch.empty(blocks.longest, dtype=torch.float64, device=device)
    if convert:
        x_buf, y_buf = torch.empty_like(product), torch.empty_like(product)
    for k0, k1, lo, hi in blocks.chunks:
        x, y = a[lo:hi], b[lo:hi]
        if convert:
            x, y = x_buf[: hi - lo].copy_(x), y_buf[: hi - lo].copy_(y)
        p = product[: hi - lo]
        for q, (u, v) in enumerate(((x, y), (x, x), (y, y))):
            torch.mul(u, v, out=p)
            block_sums[q, k0:k1] = torch.segment_reduce(p, "sum", lengths=lengths[k0:k1], unsafe=True)
    # A segment's blocks are adjacent: its total is their sum in block order (0 if it has none).
    counts = blocks.counts.to(device).expand(3, nseg).contiguous()
    return torch.segment_reduce(block_sums, "sum", lengths=counts, axis=1, unsafe=True)


def combine(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor
) -> None:
    """``out = ca[s] * a + cb[s] * b`` on every segment s; ``out`` may be ``a`` or ``b`` (each
    chunk is read whole before its result is written)."""
    device, compute = a.device, compute_dtype(a.dtype)
    size = torch.finfo(compute).bits // 8
    # Per chunk element: both operands and the expanded coefficients in the compute dtype, and
    # the int64 index of each element's block that the expansion goes through.
    blocks = Blocks(offsets, chunk_elements(a.numel(), a.element_size(), 3 * size + 8, device))
    ca, cb = ca.to(device=device, dtype=compute), cb.to(device=device, dtype=compute)
    segment = blocks.segment.to(device)
    lengths = blocks.lengths.to(device)
    x_buf, y_buf, c_buf = (torch.empty(blocks.longest, dtype=compute, device=device) for _ in range(3))
    for k0, k1, lo, hi in blocks.chunks:
        x, y, c = x_buf[: hi - lo].copy_(a[lo:hi]), y_buf[: hi - lo].copy_(b[lo:hi]), c_buf[: hi - lo]
        first, last = int(blocks.segment[k0]), int(blocks.segment[k1 - 1])
        if first == last:  # one segment (the common case inside a large layer): a broadcast
            x.mul_(ca[first : first + 1])
            y.mul_(cb[first : first + 1])
        else:
            # Each element's block, then the block's coefficient: one int64 index for both.
            index = torch.repeat_interleave(lengths[k0:k1], output_size=hi - lo)
            x.mul_(torch.index_select(ca[segment[k0:k1]], 0, index, out=c))
            y.mul_(torch.index_select(cb[segment[k0:k1]], 0, index, out=c))
            del index  # before the next chunk's is made, or two would be held at once
        out[lo:hi].copy_(x.add_(y))
