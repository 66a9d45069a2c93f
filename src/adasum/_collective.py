"""``adasum.all_reduce``: Adasum across the ranks of a torch.distributed group.

The algorithm is vector halving / distance doubling (VHDD) on one flat buffer per dtype, with
the fold of :mod:`adasum.order` for world sizes that are not powers of two:

1. *fold*: each rank 2i+1 < 2r sends its buffers to rank 2i, which combines the pair locally.
2. *reduce-scatter*: among the p leaves, at distance d = 1, 2, 4, ... leaf v pairs with v ^ d;
   the slice both hold is halved by element count, each keeps one half and receives the
   partner's values of it. Each computes float64 (a.b, |a|^2, |b|^2) per layer over its half;
   these partials (one small message for all layers of all dtypes) are summed over the 2d
   leaves that hold pieces of the two vectors being combined, by recursive doubling with one
   partner at a time; then each combines its half with the resulting per-layer coefficients.
3. *all-gather*: the halves travel back in reverse order, so every leaf holds the whole result.
4. *unfold*: rank 2i sends the result to rank 2i+1.

Buffers so small that receiving every rank's copy costs less than these rounds of messages
(at most 512 KiB per rank, CPU only) take a shortcut instead: one all-gather, then every
rank runs the reducer (:func:`adasum.reduce.reduce_rows`) on the same data with the same
deterministic kernels, so the results are again bit-identical, and equal to adasum.reduce's.

Each rank sends 2 S (p-1)/p bytes for a buffer of S bytes, as a ring allreduce does, plus
tiny messages: log2(2d) at level d for the partials and log2(p) (+2 with the fold) for the
layout check. No step waits for all ranks at once. Every element of the result is computed by
exactly one rank and copied to the others, so all ranks hold bit-identical results.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum import _order as order
from adasum._groups import all_gather_single
from adasum._layout import DtypeGroup, Layout, _cached_layout
from adasum._ops import coefficients, segment_combine, segment_partials
from adasum._reduce import TreeStats, reduce_rows

__all__ = ["all_reduce", "all_reduce_flat"]


def all_reduce(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    stats: bool = False,
) -> TreeStats | None:
    """Replace each rank's tensors by the Adasum of all ranks' tensors, in place.

    Every rank of ``group`` calls this with the same number of tensors, shapes and dtypes
    (float16, bfloat16, float32, float64) in the same order; otherwise every rank raises
    ValueError naming the first mismatch. Each tensor is one layer: it gets its own dot products
    and norms, accumulated in float64. Afterwards all ranks hold bit-identical values equal, up to
    float64 rounding of the dot products, to ``adasum.reduce`` of all ranks' inputs. Tensors may be
    non-contiguous or empty; they must share one device (CPU for Gloo, CUDA for NCCL).

    With ``stats=True`` returns a :class:`~adasum.TreeStats` on every rank (the partials then
    travel by all-gathers, so that every rank sees every pair's); otherwise None.
    """
    tensor_list = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    layout = Layout.of(tensor_list)
    _check_one_device(tensor_list)
    if dist.get_world_size(group) == 1:
        return TreeStats(()) if stats else None
    device = tensor_list[0].device if tensor_list else torch.device("cpu")
    _check_layout(layout, group, device, stats)
    if not tensor_list:  # nothing to combine, but every rank still walks the same steps
        return _vhdd([torch.empty(0, device=device)], _NO_LAYERS, 0, group, stats)
    flats = [_flat_view_or_pack(layout, tensor_list, g) for g in layout.groups]
    result = _combine(flats, layout.groups, len(layout), group, stats)
    for flat, g in zip(flats, layout.groups):
        if not (len(g.layers) == 1 and flat.data_ptr() == tensor_list[g.layers[0]].data_ptr()):
            layout.unpack(flat, tensor_list, g)
    return result


def all_reduce_flat(
    buffer: torch.Tensor,
    numels: Sequence[int],
    group: dist.ProcessGroup | None = None,
    *,
    stats: bool = False,
) -> TreeStats | None:
    """:func:`all_reduce` on one contiguous 1-D buffer holding layers of ``numels`` elements end
    to end (a DDP bucket, say), in place and without a packing copy."""
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError("all_reduce_flat needs a contiguous 1-D buffer")
    if sum(numels) != buffer.numel() or any(n < 0 for n in numels):
        raise ValueError(f"the layers' sizes add up to {sum(numels)}, the buffer holds {buffer.numel()}")
    layout = _cached_layout(tuple((int(n),) for n in numels), (buffer.dtype,) * len(numels))
    Layout.of([buffer])  # dtype check before any communication
    if dist.get_world_size(group) == 1:
        return TreeStats(()) if stats else None
    _check_layout(layout, group, buffer.device, stats)
    return _combine([buffer], layout.groups or _NO_LAYERS, len(layout), group, stats)


# The layout of an empty list of layers, for calls with nothing to combine.
_NO_LAYERS = (DtypeGroup(torch.float32, (), torch.zeros(1, dtype=torch.int64)),)


def _check_one_device(tensors: list[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"adasum.all_reduce needs tensors on one device, got {sorted(map(str, devices))}")


def _flat_view_or_pack(layout: Layout, tensors: list[torch.Tensor], g: DtypeGroup) -> torch.Tensor:
    first = tensors[g.layers[0]]
    if len(g.layers) == 1 and first.is_contiguous():
        return first.view(-1)  # a single contiguous tensor is reduced where it lies
    return layout.pack(tensors, g, out=_workspace("pack", first, g.numel))


def _check_layout(layout: Layout, group, device: torch.device, stats: bool) -> None:
    """Agree on the layout before any data moves: the maximum over the ranks of (signature,
    stats) and of their negatives shows whether all ranks passed the same; only on a mismatch a
    second round names it, so that every rank raises the same clear error instead of hanging or
    exchanging garbage."""
    header = torch.tensor([layout.signature, int(stats)], dtype=torch.int64, device=device)
    agreed = _everyone_max(torch.cat([header, -header]), group)
    if torch.equal(agreed[:2], -agreed[2:]):
        return
    described = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        described, ([layout.describe(i) for i in range(len(layout))], stats), group=group
    )
    raise ValueError("adasum.all_reduce: " + _first_mismatch(described))


def _first_mismatch(described: list) -> str:
    layers0, stats0 = described[0]
    for r, (layers, st) in enumerate(described[1:], start=1):
        if len(layers) != len(layers0):
            return f"rank {r} passed {len(layers)} tensors, rank 0 passed {len(layers0)}"
        for i, (x, y) in enumerate(zip(layers, layers0)):
            if x != y:
                return f"tensor {i} is {x} on rank {r} but {y} on rank 0"
        if st != stats0:
            return f"stats={st} on rank {r} but stats={stats0} on rank 0"
    return "the ranks passed different layouts"


class _Peer:
    """Point-to-point exchanges of slices of the flat buffers with one partner."""

    def __init__(self, group, partner: int):
        self.group = group
        self.partner = partner if group is None else dist.get_global_rank(group, partner)

    def exchange(self, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> None:
        # Tags keep the dtypes' messages apart; empty slices are skipped on both sides, which
        # agree on every size because they split the same ranges the same way.
        ops = [
            dist.P2POp(dist.isend, t, self.partner, self.group, tag)
            for tag, t in enumerate(sends) if t.numel()
        ] + [
            dist.P2POp(dist.irecv, t, self.partner, self.group, tag)
            for tag, t in enumerate(recvs) if t.numel()
        ]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()


def _local_offsets(g: DtypeGroup, lo: int, hi: int) -> torch.Tensor:
    """Offsets of the group's layers clipped to the slice [lo, hi), relative to lo; layers
    outside the slice become empty segments."""
    return g.offsets.clamp(lo, hi) - lo


#: Up to this many bytes per rank (and 8 times as many received), gathering every rank's
#: buffers and reducing them locally beats VHDD's 2 log2(p) rounds of messages; measured with
#: Gloo on 2, 4 and 8 ranks, where the two cross between 256 KiB and 1 MiB per rank.
_GATHER_BYTES = 512 << 10


def _combine(
    flats: list[torch.Tensor],
    groups: Sequence[DtypeGroup],
    num_layers: int,
    group,
    stats: bool,
) -> TreeStats | None:
    world = dist.get_world_size(group)
    per_rank = sum(f.numel() * f.element_size() for f in flats)
    small = per_rank <= _GATHER_BYTES and (world - 1) * per_rank <= 8 * _GATHER_BYTES
    # On CPU the reduction is deterministic (the kernels' sums do not depend on the thread
    # count), so every rank computes the same bits; CUDA reductions need not be.
    if flats[0].device.type == "cpu" and small:
        return _gather_and_reduce(flats, groups, num_layers, group, stats)
    return _vhdd(flats, groups, num_layers, group, stats)


def _gather_and_reduce(
    flats: list[torch.Tensor],
    groups: Sequence[DtypeGroup],
    num_layers: int,
    group,
    stats: bool,
) -> TreeStats | None:
    """Every rank gathers every rank's buffers and runs the reducer on them."""
    world = dist.get_world_size(group)
    stage_stats = (
        [torch.zeros(len(stage), 3, num_layers, dtype=torch.float64) for stage in order.schedule(world)]
        if stats
        else None
    )
    for flat, g in zip(flats, groups):
        rows = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
        if flat.numel():
            all_gather_single(rows, flat, group=group)
        rows = rows.view(world, flat.numel())
        reduce_rows(rows, g, stage_stats)
        flat.copy_(rows[0])
    return TreeStats(tuple(stage_stats)) if stage_stats is not None else None


def _vhdd(
    flats: list[torch.Tensor],
    groups: Sequence[DtypeGroup],
    num_layers: int,
    group,
    stats: bool,
) -> TreeStats | None:
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    p = order.largest_power_of_two(world)
    folded = world - p
    leaf_ranks = order.leaves(world)
    me = order.leaf_index(rank, world)
    device = flats[0].device
    layer_ids = [torch.tensor(g.layers, dtype=torch.int64, device=device) for g in groups]
    stage_stats: list[torch.Tensor] = []

    def partials_row(parts: list[torch.Tensor]) -> torch.Tensor:
        row = torch.zeros(3, num_layers, dtype=torch.float64, device=device)
        for ids, part in zip(layer_ids, parts):
            row[:, ids] = part.to(device)
        return row

    # 1. fold
    if folded and rank < 2 * folded:
        peer = _Peer(group, rank ^ 1)
        if me is None:
            peer.exchange(flats, [])
        else:
            theirs = [_workspace("recv", f, f.numel()) for f in flats]
            peer.exchange([], theirs)
            parts = []
            for f, t, g in zip(flats, theirs, groups):
                part = segment_partials(f, t, g.offsets)
                segment_combine(f, t, f, g.offsets, *coefficients(part.to(device)))
                parts.append(part)
    if folded and stats:
        folding_leaf = me is not None and rank < 2 * folded
        mine = partials_row(parts) if folding_leaf else torch.zeros(3, num_layers, dtype=torch.float64, device=device)
        everyone = _all_gather(mine, world, group)
        stage_stats.append(everyone[0 : 2 * folded : 2].cpu())

    # 2. reduce-scatter among the leaves; folded-away ranks join only the all-gathers
    ranges = [(0, f.numel()) for f in flats]
    history = []
    d = 1
    while d < p:
        if me is None:
            if stats:
                everyone = _all_gather(torch.zeros(3, num_layers, dtype=torch.float64, device=device), world, group)
        else:
            lower = (me & d) == 0
            keeps, sends = [], []
            for lo, hi in ranges:
                mid = lo + (hi - lo) // 2
                keeps.append((lo, mid) if lower else (mid, hi))
                sends.append((mid, hi) if lower else (lo, mid))
            theirs = [_workspace("recv", f, hi - lo) for f, (lo, hi) in zip(flats, keeps)]
            _Peer(group, leaf_ranks[me ^ d]).exchange(
                [f[lo:hi] for f, (lo, hi) in zip(flats, sends)], theirs
            )
            mine_kept = [f[lo:hi] for f, (lo, hi) in zip(flats, keeps)]
            local = [_local_offsets(g, lo, hi) for g, (lo, hi) in zip(groups, keeps)]
            lefts, rights = (mine_kept, theirs) if lower else (theirs, mine_kept)
            parts = [segment_partials(a, b, off) for a, b, off in zip(lefts, rights, local)]
            row = partials_row(parts)
            if stats:
                everyone = _all_gather(row, world, group)
                block = me - me % (2 * d)
                total = _ordered_sum(everyone, [leaf_ranks[j] for j in range(block, block + 2 * d)])
            else:
                total = _leaf_reduce(row, me, 2 * d, leaf_ranks, group, torch.add)
            ca, cb = coefficients(total)
            for a, b, out, off, ids in zip(lefts, rights, mine_kept, local, layer_ids):
                segment_combine(a, b, out, off, ca[ids], cb[ids])
            history.append(ranges)
            ranges = keeps
        if stats:
            blocks = [
                _ordered_sum(everyone, [leaf_ranks[j] for j in range(b, b + 2 * d)])
                for b in range(0, p, 2 * d)
            ]
            stage_stats.append(torch.stack(blocks).cpu())
        d *= 2

    # 3. all-gather among the leaves, in reverse order
    if me is not None:
        d = p // 2
        for parent in reversed(history):
            partner = me ^ d
            recv_ranges = [
                (mid, hi) if (me & d) == 0 else (lo, mid)
                for lo, hi in parent
                for mid in [lo + (hi - lo) // 2]
            ]
            _Peer(group, leaf_ranks[partner]).exchange(
                [f[lo:hi] for f, (lo, hi) in zip(flats, ranges)],
                [f[lo:hi] for f, (lo, hi) in zip(flats, recv_ranges)],
            )
            ranges = parent
            d //= 2

    # 4. unfold
    if folded and rank < 2 * folded:
        peer = _Peer(group, rank ^ 1)
        if me is None:
            peer.exchange([], flats)
        else:
            peer.exchange(flats, [])
    return TreeStats(tuple(stage_stats)) if stats else None


_WORKSPACES: dict[tuple[str, torch.dtype, torch.device, int], torch.Tensor] = {}


def _workspace(purpose: str, like: torch.Tensor, numel: int) -> torch.Tensor:
    """A buffer of ``numel`` elements reused across calls: a fresh allocation of tens of
    megabytes costs page faults on every step, about as much as the arithmetic. Holds one buffer
    per purpose ("pack" or "recv"), dtype, device and calling thread, as large as the largest
    one asked for so far."""
    key = (purpose, like.dtype, like.device, threading.get_ident())
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def _all_gather(row: torch.Tensor, world: int, group) -> torch.Tensor:
    out = torch.empty(world * row.numel(), dtype=row.dtype, device=row.device)
    all_gather_single(out, row.contiguous().view(-1), group=group)
    return out.view((world,) + tuple(row.shape))


def _leaf_reduce(t: torch.Tensor, me: int, span: int, leaf_ranks: list[int], group, op) -> torch.Tensor:
    """``op`` (an elementwise, commutative function like torch.add) of ``t`` over the ``span``
    leaves of my aligned block, by recursive doubling: log2(span) exchanges with one partner each
    instead of an all-gather that waits for every rank. Partners apply ``op`` to the same two
    operands (a + b == b + a in IEEE arithmetic), so the block's members end with identical
    results."""
    e = 1
    while e < span:
        theirs = torch.empty_like(t)
        _Peer(group, leaf_ranks[me ^ e]).exchange([t], [theirs])
        t = op(t, theirs)
        e *= 2
    return t


def _everyone_max(t: torch.Tensor, group) -> torch.Tensor:
    """Elementwise maximum of ``t`` over all ranks of ``group``, on every rank: the fold, the
    butterfly among the leaves, the unfold, as the data travel."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    p = order.largest_power_of_two(world)
    me = order.leaf_index(rank, world)
    paired = rank < 2 * (world - p)
    if paired:
        peer = _Peer(group, rank ^ 1)
        if me is None:
            peer.exchange([t], [])
            peer.exchange([], [t])
            return t
        theirs = torch.empty_like(t)
        peer.exchange([], [theirs])
        t = torch.maximum(t, theirs)
    t = _leaf_reduce(t, me, p, order.leaves(world), group, torch.maximum)
    if paired:
        peer.exchange([t], [])
    return t


def _ordered_sum(rows: torch.Tensor, which: list[int]) -> torch.Tensor:
    # A fixed left-to-right order makes the sum bit-identical on every rank that computes it.
    total = rows[which[0]].clone()
    for r in which[1:]:
        total += rows[r]
    return total
