"""allreduce in all its forms: out of place (differentiable) or in place, single or grouped,
blocking or asynchronous.

Every form runs the same steps: the ranks agree on the tensors and settings
(:mod:`adasum.horovod._agree`), the outputs receive the inputs times ``prescale_factor``, the
reduction runs, and the outputs are multiplied by ``postscale_factor``. ``op=Adasum`` reduces
with :class:`adasum.Adasum` (per tensor, any number of ranks, bit-identical on every rank);
the other operations pack the tensors into one buffer per dtype and run one
``torch.distributed.all_reduce`` each (Horovod's tensor fusion, for a grouped call), 16-bit
floats summed in float32. Average is the sum divided by the number of ranks (integers: rounded
toward zero, as Horovod does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import torch
import torch.distributed as dist

from adasum._adasum import Adasum as _AdasumReducer
from adasum._check import local_problem
from adasum._groups import device_type_of
from adasum._layout import Layout
from adasum.horovod._agree import agree, describe
from adasum.horovod._handles import Handle, HorovodInternalError
from adasum.horovod._reduce_ops import Adasum, Average, Compression, Max, Min, ReduceOp, Sum, resolve_op
from adasum.horovod._runtime import group_of

__all__ = [
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "scale_",
]

_TORCH_OPS = {
    ReduceOp.Average: dist.ReduceOp.SUM, ReduceOp.Sum: dist.ReduceOp.SUM, ReduceOp.Min: dist.ReduceOp.MIN,
    ReduceOp.Max: dist.ReduceOp.MAX, ReduceOp.Product: dist.ReduceOp.PRODUCT,
}

# One Adasum reducer per process group, so its buffers are reused from call to call.
_reducers: dict[dist.ProcessGroup | None, _AdasumReducer] = {}


def scale_(tensors: Sequence[torch.Tensor], factor: float) -> None:
    """Multiply in place (integer tensors: rounded toward zero)."""
    if factor == 1.0:
        return
    for t in tensors:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.mul_(factor)
        else:
            t.copy_(t * factor)


def _problem(tensors: Sequence[object], op: ReduceOp | None, group) -> str | None:
    """What this rank alone sees wrong with its tensors."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            return f"item {i} is a {type(t).__name__}, not a torch.Tensor"
        if t.layout != torch.strided:
            return f"tensor {i} is {t.layout}; allreduce needs dense tensors (sparse_as_dense=True in the optimizer)"
    dense = cast(Sequence[torch.Tensor], tensors)  # every item was checked above
    if op is Adasum:
        found = local_problem(list(dense), device_type_of(group))
        return None if found is None else found.message
    if len({t.device for t in dense}) > 1:
        return "the tensors of one call are on several devices"
    carried = device_type_of(group)
    if dense and carried is not None and dense[0].device.type != carried:
        return f"the tensors are on {dense[0].device}, but the process group carries {carried} tensors"
    return None


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the ranks pass to one allreduce besides the tensors, and agree on."""

    operation: str  # the function called, for messages (its kind is agreed on)
    op: object = None
    average: bool | None = None
    prescale_factor: float = 1.0
    postscale_factor: float = 1.0
    process_set: dist.ProcessGroup | None = None
    name: str | None = None

    def gradient(self, op: ReduceOp) -> _Call:
        """The reduction of the output gradients in the backward pass (unnamed)."""
        return dataclasses.replace(self, op=op, average=None, name=None)


def _start(tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], call: _Call) -> Handle:
    """Agree, then start the reduction of ``tensors`` into ``outputs`` (the same tensors for
    the in-place forms).

    ``name`` is part of what the ranks agree on: Horovod matched operations by name, and
    torch.distributed matches them by the order the ranks issue them, so two named operations
    issued in different orders make every rank raise rather than pair the wrong tensors.
    """
    group = group_of(call.process_set)
    resolved, problem = resolve_op(call.op, call.average)
    setting = (
        ("name", call.name), ("op", resolved.name if resolved is not None else repr(call.op)),
        ("prescale_factor", float(call.prescale_factor)), ("postscale_factor", float(call.postscale_factor)),
    )
    problem = problem or _problem(tensors, resolved, group)
    agree(group, call.operation, [describe(t) for t in tensors], setting, problem)
    assert resolved is not None, "agree raises on every rank when the op is not one"
    with torch.no_grad():
        for out, t in zip(outputs, tensors):
            if out is not t:
                out.copy_(t)
        scale_(outputs, call.prescale_factor)
        if resolved is Adasum:
            _adasum(outputs, group)
            return Handle([], lambda: _finished(outputs, call.postscale_factor))
        return _start_torch(outputs, resolved, call.postscale_factor, group)


def _adasum(tensors: Sequence[torch.Tensor], group) -> None:
    """Adasum in place, with the group's reducer (kept, so its buffers are reused)."""
    if group not in _reducers:
        _reducers[group] = _AdasumReducer(group)
    try:
        # Agreed before: same shapes, dtypes, device and op everywhere, so the engine's own
        # agreement round would only repeat the answer.
        reducer = _reducers[group]
        reducer.all_reduce(tensors, agreement=reducer.agreement(tensors))
    except RuntimeError as e:  # the exchanges failed: a peer died or the group timed out
        raise HorovodInternalError(str(e)) from e


def _start_torch(outputs: Sequence[torch.Tensor], op: ReduceOp, postscale_factor: float, group) -> Handle:
    """One asynchronous torch.distributed all-reduce per dtype over packed buffers."""
    layout = Layout.of(list(outputs))
    packed, wide, works = [], [], []
    for g in layout.groups:
        flat = _flat(layout, outputs, g)
        work_buffer = _reduction_buffer(flat, op)
        works.append(dist.all_reduce(work_buffer, op=_TORCH_OPS[op], group=group, async_op=True))
        packed.append(flat)
        wide.append(work_buffer)
    ranks = dist.get_world_size(group)

    def finish() -> Sequence[torch.Tensor]:
        with torch.no_grad():
            for g, flat, work_buffer in zip(layout.groups, packed, wide):
                if op is Average:
                    _divide(work_buffer, ranks)
                if work_buffer is not flat:
                    flat.copy_(work_buffer)
                if not _lone(outputs, g):
                    layout.unpack(flat, list(outputs), g)
        return _finished(outputs, postscale_factor)

    return Handle(works, finish)


# Integer types Gloo and NCCL lack, and the wider signed type each is reduced in.
_WIDER = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64}


def _reduction_buffer(flat: torch.Tensor, op: ReduceOp) -> torch.Tensor:
    """Where ``flat`` is reduced: 16-bit floats are summed in float32 and rounded once; int16,
    uint16 and uint32, which Gloo and NCCL lack, in a wider signed type (converted back it
    wraps as a sum or product in the type would; an Average is exact unless the sum overflows
    the type); uint64 as the int64 view of its bits, whose sums and products wrap to the same
    bits (an Average is exact while the sum is below 2**63; Min and Max would compare as signed)."""
    if flat.dtype in (torch.float16, torch.bfloat16) and op not in (Min, Max):
        return flat.float()
    if flat.dtype in _WIDER:
        return flat.to(_WIDER[flat.dtype])
    if flat.dtype == torch.uint64:
        if op in (Min, Max):
            raise TypeError(f"hvd.allreduce: op={op.name} of uint64 tensors is not offered (no backend compares "
                            "them); convert to int64 or float64")
        return flat.view(torch.int64)
    return flat


def _lone(tensors: Sequence[torch.Tensor], g) -> bool:
    """Whether the dtype group is one contiguous tensor, reduced where it lies."""
    return len(g.layers) == 1 and tensors[g.layers[0]].is_contiguous()


def _flat(layout: Layout, tensors: Sequence[torch.Tensor], g) -> torch.Tensor:
    """The group's tensors as one 1-D buffer: a lone contiguous tensor's view, else a packed copy."""
    return tensors[g.layers[0]].view(-1) if _lone(tensors, g) else layout.pack(list(tensors), g)


def _like(t: torch.Tensor) -> torch.Tensor:
    """A new output for ``t`` (anything else is passed on, for the agreement to report)."""
    return torch.empty_like(t) if isinstance(t, torch.Tensor) else t


def _divide(t: torch.Tensor, n: int) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.div_(n)
    else:
        t.div_(n, rounding_mode="trunc")


def _finished(outputs: Sequence[torch.Tensor], postscale_factor: float) -> Sequence[torch.Tensor]:
    with torch.no_grad():
        scale_(outputs, postscale_factor)
    return outputs


# -- in place and asynchronous -------------------------------------------------------------

def grouped_allreduce_async_(
    tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None, op: object = None,
    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> Handle:
    """Start reducing each of ``tensors`` in place over all ranks (position i with position
    i); :func:`synchronize` returns the list."""
    call = _Call("grouped_allreduce_", op, average, prescale_factor, postscale_factor, process_set, name)
    return _start(tensors, tensors, call)


def grouped_allreduce_async(
    tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None, op: object = None,
    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> Handle:
    """:func:`grouped_allreduce_async_` into new tensors; the inputs are not changed."""
    call = _Call("grouped_allreduce", op, average, prescale_factor, postscale_factor, process_set, name)
    return _start(tensors, [_like(t) for t in tensors], call)


def grouped_allreduce_(
    tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None, op: object = None,
    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Reduce each of ``tensors`` in place over all ranks; returns them."""
    return list(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set).wait())


def allreduce_async_(
    tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: object = None,
    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> Handle:
    """Start reducing ``tensor`` in place; :func:`synchronize` returns it."""
    call = _Call("allreduce_", op, average, prescale_factor, postscale_factor, process_set, name)
    return _single(_start([tensor], [tensor], call))


def allreduce_async(
    tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: object = None,
    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> Handle:
    """Start reducing a copy of ``tensor``; :func:`synchronize` returns the result."""
    call = _Call("allreduce", op, average, prescale_factor, postscale_factor, process_set, name)
    return _single(_start([tensor], [_like(tensor)], call))


def _single(handle: Handle) -> Handle:
    return Handle([handle], lambda: handle.wait()[0])


def allreduce_(
    tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: object = None,
    prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks; returns it."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set).wait()


# -- out of place, differentiable ----------------------------------------------------------

class _Allreduce(torch.autograd.Function):
    """The reduction as an autograd node. With L the sum over ranks of each rank's loss, the
    gradient of a Sum (Average) reduction is the Sum (Average) of the ranks' output gradients;
    of Min or Max, that sum where this rank's input was the result (every tied rank gets it).
    Adasum and Product have no gradient here."""

    @staticmethod
    def forward(ctx, call: _Call, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = _start(tensors, [_like(t) for t in tensors], call).wait()
        ctx.call = call
        ctx.op, _ = resolve_op(call.op, call.average)
        if ctx.op in (Min, Max):  # whose input was the result
            pre, post = call.prescale_factor, call.postscale_factor
            ctx.save_for_backward(*[(t * pre == r / post) for t, r in zip(tensors, result)])
        return tuple(result)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        if ctx.op not in (Sum, Average, Min, Max):
            raise NotImplementedError(
                f"adasum.horovod: the gradient of allreduce with op={ctx.op.name} is not "
                "implemented; use op=Sum or op=Average inside a differentiated graph"
            )
        dense = [g.contiguous() for g in grads]
        outputs = [torch.empty_like(g) for g in dense]
        if ctx.op in (Sum, Average):
            return (None, *_start(dense, outputs, ctx.call.gradient(ctx.op)).wait())
        summed = _start(dense, outputs, ctx.call.gradient(Sum)).wait()
        return (None, *[s * mask for s, mask in zip(summed, ctx.saved_tensors)])


def grouped_allreduce(
    tensors: Sequence[torch.Tensor], average: bool | None = None, name: str | None = None,
    compression=Compression.none, op: object = None, prescale_factor: float = 1.0,
    postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """The reduction of each of ``tensors`` over all ranks, as new tensors (differentiable for
    Sum, Average, Min and Max); each travels compressed by ``compression``."""
    compressed = [compression.compress(t) for t in tensors]
    call = _Call("grouped_allreduce", op, average, prescale_factor, postscale_factor, process_set, name)
    reduced = _Allreduce.apply(call, *[c for c, _ in compressed])
    return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, compressed)]


def allreduce(
    tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
    compression=Compression.none, op: object = None, prescale_factor: float = 1.0,
    postscale_factor: float = 1.0, process_set: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The reduction of ``tensor`` over all ranks (default: the average), as a new tensor.

    ``op=Adasum`` gives the Adasum of the ranks' tensors (:func:`adasum.all_reduce`: any
    number of ranks, bit-identical everywhere). Differentiable for Sum, Average, Min and Max.
    Every rank passes the same shape, dtype, op, factors and ``name``, or every rank raises
    :class:`MismatchError`.
    """
    compressed, ctx = compression.compress(tensor)
    call = _Call("allreduce", op, average, prescale_factor, postscale_factor, process_set, name)
    (reduced,) = _Allreduce.apply(call, compressed)
    return compression.decompress(reduced, ctx)
