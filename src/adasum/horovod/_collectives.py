"""The other collectives: allgather, broadcast, alltoall, reducescatter, barrier, join.

Each starts with the agreement of :mod:`adasum.horovod._agree` (same operation, compatible
tensors, valid arguments on every rank, or every rank raises) and then runs on
torch.distributed under the process group's timeout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum._groups import all_gather_single, device_type_of, message_device
from adasum.horovod._agree import MismatchError, agree, describe
from adasum.horovod._allreduce import allreduce, grouped_allreduce_async
from adasum.horovod._handles import Handle
from adasum.horovod._reduce_ops import Average, Compression, Sum, resolve_op
from adasum.horovod._runtime import group_of

__all__ = [
    "allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "reducescatter", "barrier", "join", "root_of", "broadcast_many_async_",
]


def _tensor_problem(tensors: Sequence[object], group, *, min_dim: int = 0) -> str | None:
    carried = device_type_of(group)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            return f"item {i} is a {type(t).__name__}, not a torch.Tensor"
        if t.layout != torch.strided:
            return f"tensor {i} is {t.layout}; dense tensors only"
        if t.dim() < min_dim:
            return f"tensor {i} has {t.dim()} dimensions; this operation needs at least {min_dim}"
        if carried is not None and t.device.type != carried:
            return f"tensor {i} is on {t.device}, but the process group carries {carried} tensors"
    return None


# Gloo and NCCL have no int16 and no unsigned type wider than 8 bits (TensorFlow's uint16,
# uint32, uint64 arrive as torch's): such a tensor travels as a type of the same width they have.
_CARRIERS = {torch.int16: torch.float16, torch.uint16: torch.float16, torch.uint32: torch.int32,
             torch.uint64: torch.int64}


def carried(t: torch.Tensor) -> torch.Tensor:
    """``t`` as Gloo and NCCL can move it: a dtype they lack travels as the view of the same
    bytes as one they have (moved, never computed on, so every bit arrives as sent); results
    written to the view land in ``t``."""
    return t.view(_CARRIERS[t.dtype]) if t.dtype in _CARRIERS else t


def root_of(root_rank: object, group) -> tuple[int | None, str | None]:
    """The global rank of group rank ``root_rank``, or a problem to report."""
    world = dist.get_world_size(group)
    if not isinstance(root_rank, int) or not 0 <= root_rank < world:
        return None, f"root_rank={root_rank!r} is not a rank of the {world} processes"
    return (root_rank if group is None else dist.get_global_rank(group, root_rank)), None


# -- allgather -----------------------------------------------------------------------------

def grouped_allgather_async(
    tensors: Sequence[torch.Tensor], name: str | None = None, process_set: dist.ProcessGroup | None = None
) -> Handle:
    """Start concatenating, for each position, every rank's tensor along dimension 0 (in rank
    order; the first dimension may differ between ranks, the others not)."""
    return _start_allgather(tensors, process_set, "grouped_allgather", name)[0]


def _start_allgather(
    tensors: Sequence[torch.Tensor], process_set, operation: str, name: str | None
) -> tuple[Handle, list[list[int]]]:
    """The gather in flight, and ``counts[i][r]``: the rows of tensor i on rank r. The ranks
    exchange their row counts, then every tensor travels padded to the longest rank's rows
    (torch's all-gather needs equal sizes) and the padding is cut away."""
    group = group_of(process_set)
    agree(group, operation, [describe(t, any_first_dim=True) for t in tensors], (("name", name),),
          _tensor_problem(tensors, group, min_dim=1))
    world = dist.get_world_size(group)
    rows = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=message_device(group))
    everyone = torch.empty(world * len(tensors), dtype=torch.int64, device=rows.device)
    if len(tensors):
        all_gather_single(everyone, rows, group=group)
    counts = everyone.view(world, len(tensors)).t().tolist()
    gathered, works = [], []
    with torch.no_grad():
        for t, n in zip(tensors, counts):
            most = max(n)
            padded = t.contiguous() if t.shape[0] == most else torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
            out = t.new_empty((world * most, *t.shape[1:]))
            if out.numel():  # every rank knows the counts, so every rank skips alike
                works.append(all_gather_single(carried(out), carried(padded), group=group, async_op=True))
            gathered.append((out, n, most))

    def finish() -> list[torch.Tensor]:
        return [torch.cat([out[r * most: r * most + n[r]] for r in range(world)]) for out, n, most in gathered]

    return Handle(works, finish), counts


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: dist.ProcessGroup | None = None) -> Handle:
    """:func:`grouped_allgather_async` of one tensor; :func:`synchronize` returns the result."""
    handle, _ = _start_allgather([tensor], process_set, "allgather", name)
    return Handle([handle], lambda: handle.wait()[0])


class _Allgather(torch.autograd.Function):
    """Gradient as Horovod defines it: this rank's rows of the average over the ranks of the
    output gradients (the ranks' losses taken as averaged)."""

    @staticmethod
    def forward(ctx, process_set, operation: str, name: str | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        handle, counts = _start_allgather(tensors, process_set, operation, name)
        me = dist.get_rank(group_of(process_set))
        ctx.process_set = process_set
        ctx.rows = [(sum(n[:me]), n[me]) for n in counts]  # where this rank's rows are
        return tuple(handle.wait())

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        averaged = grouped_allreduce_async([g.contiguous() for g in grads], op=Average, process_set=ctx.process_set).wait()
        return (None, None, None, *[a.narrow(0, start, n) for a, (start, n) in zip(averaged, ctx.rows)])


def grouped_allgather(
    tensors: Sequence[torch.Tensor], name: str | None = None, process_set: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Each position's tensors of every rank, concatenated along dimension 0 in rank order
    (differentiable)."""
    return list(_Allgather.apply(process_set, "grouped_allgather", name, *tensors))


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0 in rank order; the first
    dimension may differ between ranks (differentiable)."""
    return _Allgather.apply(process_set, "allgather", name, tensor)[0]


# -- broadcast -----------------------------------------------------------------------------

def broadcast_many_async_(
    tensors: Sequence[torch.Tensor], root_rank: int, process_set: dist.ProcessGroup | None, operation: str,
    name: str | None = None, names: Sequence[str] | None = None,
) -> Handle:
    """Start overwriting every rank's ``tensors`` with their values on ``root_rank`` (a rank of
    ``process_set``), after one agreement for all of them (``names`` label the tensors in its
    messages); the result is the list."""
    group = group_of(process_set)
    root, problem = root_of(root_rank, group)
    described = [describe(t) for t in tensors] if names is None else [f"{n}: {describe(t)}" for n, t in zip(names, tensors)]
    agree(group, operation, described, (("name", name), ("root_rank", root_rank)),
          problem or _tensor_problem(tensors, group))
    targets = [t.detach() if t.is_contiguous() else t.detach().contiguous() for t in tensors]
    works = [dist.broadcast(carried(t), src=root, group=group, async_op=True) for t in targets]

    def finish() -> list[torch.Tensor]:
        with torch.no_grad():
            for t, target in zip(tensors, targets):
                if target.data_ptr() != t.data_ptr():
                    t.copy_(target)
        return list(tensors)

    return Handle(works, finish)


def broadcast_async_(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: dist.ProcessGroup | None = None
) -> Handle:
    """Start overwriting ``tensor`` on every rank with its value on ``root_rank`` (a rank of
    ``process_set``); :func:`synchronize` returns it."""
    handle = broadcast_many_async_([tensor], root_rank, process_set, "broadcast_", name)
    return Handle([handle], lambda: handle.wait()[0])


def broadcast_async(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: dist.ProcessGroup | None = None
) -> Handle:
    """:func:`broadcast_async_` into a copy; ``tensor`` is not changed."""
    copy = tensor.detach().clone() if isinstance(tensor, torch.Tensor) else tensor
    return broadcast_async_(copy, root_rank, name, process_set)


def broadcast_(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Overwrite ``tensor`` with its value on ``root_rank``; returns it."""
    return broadcast_async_(tensor, root_rank, name, process_set).wait()


class _Broadcast(torch.autograd.Function):
    """Gradient as Horovod defines it: on the root, the average over the ranks of the output
    gradients; zero elsewhere (their input did not reach the output)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, root_rank: int, name: str | None, process_set) -> torch.Tensor:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return broadcast_async(tensor, root_rank, name, process_set).wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        averaged = allreduce(grad.contiguous(), op=Average, process_set=ctx.process_set)
        if dist.get_rank(group_of(ctx.process_set)) != ctx.root_rank:
            averaged = torch.zeros_like(averaged)
        return averaged, None, None, None


def broadcast(
    tensor: torch.Tensor, root_rank: int, name: str | None = None, process_set: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``tensor``'s value on ``root_rank``, as a new tensor on every rank (differentiable)."""
    return _Broadcast.apply(tensor, root_rank, name, process_set)


# -- alltoall, reducescatter -----------------------------------------------------------------

def _splits_problem(tensor: torch.Tensor, splits: Sequence[int] | torch.Tensor | None, world: int) -> str | None:
    if splits is None:
        if tensor.shape[0] % world:
            return f"dimension 0 ({tensor.shape[0]}) does not divide among {world} ranks; pass splits="
        return None
    values = splits.tolist() if isinstance(splits, torch.Tensor) else list(splits)
    if len(values) != world or any(not isinstance(v, int) or v < 0 for v in values):
        return f"splits={values} is not {world} non-negative integers"
    if sum(values) != tensor.shape[0]:
        return f"splits add up to {sum(values)}, dimension 0 is {tensor.shape[0]}"
    return None


def _alltoall(
    tensor: torch.Tensor, splits: Sequence[int] | torch.Tensor | None, name: str | None, process_set,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows received, in rank order, and how many came from each rank (int32, CPU)."""
    group = group_of(process_set)
    world = dist.get_world_size(group)
    problem = _tensor_problem([tensor], group, min_dim=1)
    problem = problem or _splits_problem(tensor, splits, world)
    setting = (("name", name), ("splits", splits is not None))
    agree(group, "alltoall", [describe(tensor, any_first_dim=True)], setting, problem)
    sent = [tensor.shape[0] // world] * world if splits is None else [int(v) for v in (
        splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    counts = torch.tensor(sent, dtype=torch.int64, device=message_device(group))
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    got = received.tolist()
    out = tensor.new_empty((sum(got), *tensor.shape[1:]))
    dist.all_to_all_single(carried(out), carried(tensor.detach().contiguous()), got, sent, group=group)
    return out, received.to(torch.int32).cpu()


class _Alltoall(torch.autograd.Function):
    """alltoall moves rows without arithmetic: output row j of rank r is one input row of one
    rank. The derivative of the sum of the ranks' losses with respect to that input row is
    therefore the gradient of output row j on rank r, sent back the way the row came: an
    alltoall of the output gradients with the received counts as splits (Horovod's gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, splits, name: str | None, process_set) -> tuple[torch.Tensor, torch.Tensor]:
        out, received = _alltoall(tensor, splits, name, process_set)
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _counts: torch.Tensor | None) -> tuple:
        back, _ = _alltoall(grad.contiguous(), ctx.received, None, ctx.process_set)
        return back, None, None, None


def alltoall(
    tensor: torch.Tensor, splits: Sequence[int] | torch.Tensor | None = None, name: str | None = None,
    process_set: dist.ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Send rows ``splits[r]`` of ``tensor`` (dimension 0, in order; default: equal parts) to
    rank r and return the rows received, in rank order; with ``splits``, also how many rows
    came from each rank (int32). Differentiable: the gradient goes back the way the rows came."""
    out, received = _Alltoall.apply(tensor, splits, name, process_set)
    return out if splits is None else (out, received)


class _Reducescatter(torch.autograd.Function):
    """Rank r's block of rows of post * op_s(pre * x_s). With Sum, the derivative of the sum of
    the ranks' losses with respect to block r of x_s is pre * post * g_r (g_r: rank r's output
    gradient; Average: divided by N). The gradient here is Horovod's: the allgather of the
    g_r (every rank's block in place) times pre * post, and times N for Sum, which is N times
    that derivative, for Sum and Average alike; kept so that migrated code gets Horovod's
    numbers. Other operations have no gradient here."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, name: str | None, compression, op: object, process_set,
                prescale_factor: float, postscale_factor: float) -> torch.Tensor:
        group = group_of(process_set)
        world, me = dist.get_world_size(group), dist.get_rank(group)
        reduced = allreduce(tensor, name=name, compression=compression, op=op, prescale_factor=prescale_factor,
                            postscale_factor=postscale_factor, process_set=process_set)
        if reduced.dim() == 0:  # the same shape on every rank (agreed), so every rank raises
            raise MismatchError("hvd.reducescatter: needs a tensor with at least one dimension")
        ctx.op, _ = resolve_op(op, None)
        ctx.process_set = process_set
        ctx.factor = prescale_factor * postscale_factor * (world if ctx.op is Sum else 1)
        q, m = divmod(reduced.shape[0], world)
        return reduced[me * q + min(me, m): (me + 1) * q + min(me + 1, m)].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        if ctx.op not in (Sum, Average):
            raise NotImplementedError(
                f"adasum.horovod: the gradient of reducescatter with op={ctx.op.name} is not "
                "implemented; use op=Sum or op=Average inside a differentiated graph"
            )
        handle, _ = _start_allgather([grad.contiguous()], ctx.process_set, "allgather", None)
        return (handle.wait()[0] * ctx.factor, None, None, None, None, None, None)


def reducescatter(
    tensor: torch.Tensor, name: str | None = None, compression=Compression.none, op: object = Average,
    process_set: dist.ProcessGroup | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
) -> torch.Tensor:
    """This rank's block of dimension 0 of the reduction of every rank's ``tensor``: rank r
    gets rows [r*q + min(r, m), ...) with q, m = divmod(rows, ranks), the first m ranks one
    row more. Computed as an allreduce of the whole tensor (any ``op``, Adasum included) and a
    slice: the result of a reduce-scatter at twice its traffic. Differentiable for Sum and
    Average, with Horovod's gradient (:class:`_Reducescatter`)."""
    return _Reducescatter.apply(tensor, name, compression, op, process_set, prescale_factor, postscale_factor)


# -- synchronisation -----------------------------------------------------------------------

def barrier(process_set: dist.ProcessGroup | None = None) -> None:
    """Return when every rank has called it (within the process group's timeout)."""
    agree(group_of(process_set), "barrier", [], (), None)


def join(device: int = -1) -> int:
    """Wait until every rank has called ``join``; returns the rank that called last (by the
    ranks' own clocks), the same on every rank. ``device`` is accepted for Horovod's scripts
    (its join made zero tensors there) and not needed.

    Horovod's join also made a rank that ran out of data stand in, with zeros, for the other
    ranks' allreduces until they joined too. Here every rank must issue the same operations
    in the same order: a rank in ``join`` while others reduce makes every rank raise
    :class:`MismatchError` (nothing hangs). Give every rank the same number of batches.
    """
    arrived = time.time()
    group = group_of(None)
    agree(group, "join", [], (), None)
    times = torch.tensor([arrived], dtype=torch.float64, device=message_device(group))
    everyone = torch.empty(dist.get_world_size(group), dtype=torch.float64, device=times.device)
    all_gather_single(everyone, times, group=group)
    return int(everyone.argmax())
