r"""Hierarchical Adasum: average inside each node, Adasum across nodes.

With ``nodes`` nodes of ``local_size`` ranks each (ranks ``k * local_size ... (k+1) *
local_size - 1`` on node k, the way torchrun numbers them), and rank r's tensor x_r:

.. math::

    \bar x_k = \frac{1}{L} \sum_{r \in \text{node } k} x_r, \qquad
    \text{result} = \mathrm{Adasum}(\bar x_0, \ldots, \bar x_{\text{nodes}-1})

per layer, with Adasum in the order of rule 4 over the node index; every rank receives the
result, bit-identical. Ranks in one node share fast links and their gradients come from the same
optimizer step, so averaging there is cheap; Adasum is applied where it pays, across nodes.

How the work is split: after the node average, local rank j of every node owns a contiguous share
of the layers (balanced by element count) and runs :func:`adasum.all_reduce_flat` on it with the
local ranks j of the other nodes; the shares are then all-gathered inside the node. Each layer is
combined by exactly one group, so the result does not depend on which rank computed it, and the
traffic across nodes is about 1/local_size of a flat Adasum's.

On a single node there is nothing to combine across; instead of silently averaging (which would
mean no Adasum at all), :class:`Hierarchy` warns and applies Adasum across all ranks of the node,
i.e. it treats every rank as a node.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum import _order as order
from adasum._groups import all_gather_single
from adasum._collective import all_reduce_flat
from adasum._layout import Layout
from adasum._ops import offsets_of
from adasum._reduce import TreeStats

__all__ = ["Hierarchy", "split_layers"]



def split_layers(offsets: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Split layers with the given offsets ``[0, n0, n0 + n1, ...]`` into ``parts`` contiguous
    ranges of layer indices ``[a, b)`` with about equal element counts (some may be empty).

    Range j ends at the first layer boundary at or after j/parts of the elements, so every
    range but the last holds at most its share plus one layer.
    """
    num_layers = len(offsets) - 1
    total = offsets[-1]
    bounds = [0]
    layer = 0
    for j in range(1, parts):
        target = total * j / parts
        while layer < num_layers and offsets[layer + 1] <= target:
            layer += 1
        # Give a layer that straddles the target to the range where most of it lies.
        if layer < num_layers and target - offsets[layer] > offsets[layer + 1] - target:
            layer += 1
        bounds.append(max(layer, bounds[-1]))
    bounds.append(num_layers)
    return list(zip(bounds[:-1], bounds[1:]))


class Hierarchy:
    """Process groups and collectives for hierarchical Adasum over the default (world) group.

    Every rank of the world must construct it at the same point (it creates process groups).

    Args:
        local_size: ranks per node; default ``LOCAL_WORLD_SIZE`` from the environment (set by
            torchrun). Any value that divides the world size; with a single node (local_size
            equal to the world size) see the module docstring: it warns and runs Adasum across
            all ranks.

    Attributes: ``nodes``, ``local_size`` (as applied), ``node`` and ``local_rank`` of this rank,
    ``single_node`` (True when the fallback above is in effect), ``world`` (the group spanning
    all ranks, None for the default group).
    """

    def __init__(self, local_size: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Hierarchy needs an initialised torch.distributed default group")
        world = dist.get_world_size()
        rank = dist.get_rank()
        if local_size is None:
            env = os.environ.get("LOCAL_WORLD_SIZE")
            if env is None:
                raise ValueError("pass local_size or set LOCAL_WORLD_SIZE (torchrun sets it)")
            local_size = int(env)
        if local_size < 1 or world % local_size:
            raise ValueError(
                f"{world} ranks cannot be split into nodes of {local_size}: hierarchical mode "
                "needs the same number of ranks on every node"
            )
        self.world: dist.ProcessGroup | None = None
        self.single_node = world // local_size == 1 and world > 1
        if self.single_node:
            warnings.warn(
                f"adasum.hierarchical: all {world} ranks are on one node, so there is no "
                "cross-node level; applying Adasum across the node's ranks (each rank counts as "
                "a node) instead of averaging, which would skip Adasum altogether",
                stacklevel=2,
            )
            local_size = 1
        self.local_size = local_size
        self.nodes = world // local_size
        self.node, self.local_rank = divmod(rank, local_size)
        self.intra: dist.ProcessGroup | None = None
        self.cross: dist.ProcessGroup | None = None
        # new_group is collective over the world: every rank creates every group, in one order.
        if local_size > 1:
            for k in range(self.nodes):
                g = dist.new_group(list(range(k * local_size, (k + 1) * local_size)))
                if k == self.node:
                    self.intra = g
            for j in range(local_size):
                g = dist.new_group(list(range(j, world, local_size)))
                if j == self.local_rank:
                    self.cross = g

    def __repr__(self) -> str:
        return f"Hierarchy(nodes={self.nodes}, local_size={self.local_size})"

    def all_reduce(
        self, tensors: torch.Tensor | Sequence[torch.Tensor], *, stats: bool = False
    ) -> TreeStats | None:
        """Replace every rank's tensors by the hierarchical Adasum (module docstring), in place.

        Same calling rules as :func:`adasum.all_reduce` (same layout on every rank, supported
        dtypes, one device). With ``stats=True`` returns the TreeStats of the cross-node
        combinations (per layer, over the node averages) on every rank.
        """
        tensor_list = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        layout = Layout.of(tensor_list)
        stages = self._empty_stats(len(layout)) if stats else None
        for g in layout.groups:
            flat = layout.pack(tensor_list, g)
            self._reduce_flat(flat, [int(x) for x in g.offsets], list(g.layers), stages)
            layout.unpack(flat, tensor_list, g)
        return self._finish_stats(stages)

    def all_reduce_flat(
        self, buffer: torch.Tensor, numels: Sequence[int], *, stats: bool = False
    ) -> TreeStats | None:
        """:meth:`all_reduce` on one contiguous 1-D buffer of layers of ``numels`` elements end
        to end (a DDP bucket), in place."""
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("all_reduce_flat needs a contiguous 1-D buffer")
        if sum(numels) != buffer.numel():
            raise ValueError(f"the layers' sizes add up to {sum(numels)}, the buffer holds {buffer.numel()}")
        Layout.of([buffer])  # dtype check
        stages = self._empty_stats(len(numels)) if stats else None
        offsets = [int(x) for x in offsets_of(list(numels))]
        self._reduce_flat(buffer, offsets, list(range(len(numels))), stages)
        return self._finish_stats(stages)

    def _empty_stats(self, num_layers: int) -> list[torch.Tensor]:
        return [
            torch.zeros(len(stage), 3, num_layers, dtype=torch.float64)
            for stage in order.schedule(self.nodes)
        ]

    def _finish_stats(self, stages: list[torch.Tensor] | None) -> TreeStats | None:
        if stages is None:
            return None
        if self.intra is not None and stages:
            # Each layer's numbers are on the one local rank that combined it, zeros elsewhere:
            # the sum is an exact copy.
            packed = torch.cat([s.reshape(-1) for s in stages])
            dist.all_reduce(packed, group=self.intra)
            chunks = torch.split(packed, [s.numel() for s in stages])
            stages = [chunk.view(s.shape) for chunk, s in zip(chunks, stages)]
        return TreeStats(tuple(stages))

    def _reduce_flat(
        self, flat: torch.Tensor, offsets: list[int], layer_ids: list[int], stages: list[torch.Tensor] | None
    ) -> None:
        if self.intra is not None:
            # Half precision is summed in float32: a sum of local_size values in bfloat16 would
            # lose most of the mantissa before the division.
            work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
            dist.all_reduce(work, group=self.intra)
            work.div_(self.local_size)
            if work is not flat:
                flat.copy_(work)
        shares = split_layers(offsets, self.local_size)
        a, b = shares[self.local_rank]
        lo, hi = offsets[a], offsets[b]
        if b > a:
            numels = [offsets[i + 1] - offsets[i] for i in range(a, b)]
            tree = all_reduce_flat(flat[lo:hi], numels, self.cross, stats=stages is not None)
            if stages is not None:
                for s, stage in enumerate(tree.stages):
                    stages[s][:, :, layer_ids[a:b]] = stage
        if self.intra is not None:
            self._gather_shares(flat, [(offsets[x], offsets[y]) for x, y in shares])

    def _gather_shares(self, flat: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        # Bytes, not values, travel: the copy is exact and independent of Gloo's dtype support.
        width = max(hi - lo for lo, hi in ranges) * flat.element_size()
        lo, hi = ranges[self.local_rank]
        mine = torch.zeros(width, dtype=torch.uint8, device=flat.device)
        mine[: (hi - lo) * flat.element_size()] = flat[lo:hi].view(torch.uint8)
        everyone = torch.empty(self.local_size * width, dtype=torch.uint8, device=flat.device)
        all_gather_single(everyone, mine, group=self.intra)
        raw = flat.view(torch.uint8)
        size = flat.element_size()
        for j, (lo, hi) in enumerate(ranges):
            raw[lo * size : hi * size] = everyone[j * width : j * width + (hi - lo) * size]
