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
of the layers (balanced by element count) and reduces it with Adasum together with the local
ranks j of the other nodes; the shares are then all-gathered inside the node. Each layer is
combined by exactly one group, so the result does not depend on which rank computed it, and the
traffic across nodes is about 1/local_size of a flat Adasum's.

On a single node there is nothing to combine across; instead of silently averaging (which would
mean no Adasum at all), :class:`Hierarchical` warns and applies Adasum across all ranks of the node,
i.e. it treats every rank as a node.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum._adasum import Adasum
from adasum._baselines import Average, sum_over
from adasum._check import Problem, Setting
from adasum._groups import all_gather_single, global_ranks, new_group_like
from adasum._layout import DtypeGroup, Flats
from adasum._noise import pair_moments
from adasum._ops import offsets_of
from adasum._reduce import ranks_of, reduce
from adasum._reducer import Reducer
from adasum._stats import Stats, empty_stages

__all__ = ["Hierarchical", "split_layers"]


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


class Hierarchical(Reducer):
    """Average inside each node, Adasum across nodes (module docstring).

    Args:
        local_size: ranks per node; default ``LOCAL_WORLD_SIZE`` from the environment (set by
            torchrun). Any value that divides the world size; with a single node (local_size
            equal to the world size) it warns and applies Adasum across all ranks.
        group: a group spanning every rank (the default): the reducer creates one process
            group per node and one across nodes per local rank, collectively over the world,
            at its first call. Those groups inherit this group's timeout.

    ``nodes``, ``node``, ``local_rank`` and ``single_node`` describe this rank's place (they
    need an initialised process group).
    """

    name = "hierarchical"

    def __init__(self, local_size: int | None = None, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        if local_size is None:
            env = os.environ.get("LOCAL_WORLD_SIZE")
            if env is None:
                raise ValueError("pass local_size or set LOCAL_WORLD_SIZE (torchrun sets it)")
            local_size = int(env)
        if local_size < 1:
            raise ValueError(f"local_size must be at least 1, got {local_size}")
        self.local_size = local_size
        self._levels: tuple[dist.ProcessGroup | None, Adasum] | None = None

    def setting(self) -> Setting:
        return super().setting() + (("local_size", self.local_size),)

    @property
    def single_node(self) -> bool:
        """All ranks on one node: each rank then counts as a node of its own."""
        world = dist.get_world_size(self.group)
        return world == self.local_size and world > 1

    @property
    def _per_node(self) -> int:
        return 1 if self.single_node else self.local_size

    @property
    def nodes(self) -> int:
        return dist.get_world_size(self.group) // self._per_node

    @property
    def node(self) -> int:
        return dist.get_rank(self.group) // self._per_node

    @property
    def local_rank(self) -> int:
        return dist.get_rank(self.group) % self._per_node

    def reduce(self, per_rank, *, stats: bool = False):
        ranks, _, single = ranks_of(per_rank)
        per_node = 1 if len(ranks) == self.local_size else self.local_size
        if len(ranks) % per_node:
            raise ValueError(self._split_error(len(ranks)))
        averages = [Average().reduce(ranks[k : k + per_node]) for k in range(0, len(ranks), per_node)]
        out = reduce([a[0] for a in averages] if single else averages, stats=stats)
        return (out[0], _node_stats(out[1].stages, per_node)) if stats else out

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_levels": None}

    def _split_error(self, world: int) -> str:
        return (f"{world} ranks cannot be split into nodes of {self.local_size}: hierarchical mode "
                "needs the same number of ranks on every node")

    def _problem(self, tensors: Sequence[torch.Tensor]) -> Problem | None:
        world = dist.get_world_size(self.group)
        if world % self.local_size:
            return Problem(ValueError, self._split_error(world))
        if world != dist.get_world_size():
            return Problem(ValueError, "Hierarchical needs a group spanning every rank: it creates "
                                       "its node groups collectively over the world")
        return None

    def _idle_stats(self, num_layers: int) -> Stats:
        return Stats(tuple(empty_stages(self.nodes, num_layers)))

    def _groups(self) -> tuple[dist.ProcessGroup | None, Adasum]:
        """The group of this rank's node (None for nodes of one rank) and the Adasum reducer
        across nodes, created at the first call: every rank creates every group, in one order."""
        if self._levels is None:
            if self.single_node:
                warnings.warn(
                    f"adasum.Hierarchical: all {self.local_size} ranks are on one node, so there is "
                    "no cross-node level; applying Adasum across the node's ranks (each rank counts "
                    "as a node) instead of averaging, which would skip Adasum altogether",
                    stacklevel=4,
                )
            per_node, ranks = self._per_node, global_ranks(self.group)
            intra, cross = None, self.group
            if per_node > 1:
                nodes = [new_group_like(self.group, ranks[k : k + per_node]) for k in range(0, len(ranks), per_node)]
                crosses = [new_group_like(self.group, ranks[j::per_node]) for j in range(per_node)]
                intra, cross = nodes[self.node], crosses[self.local_rank]
            self._levels = (intra, Adasum(cross))
        return self._levels

    def close(self) -> None:
        super().close()
        if self._levels is not None:
            self._levels[1].close()

    def _reduce(self, flats: Flats, stats: bool) -> Stats | None:
        intra, across = self._groups()
        stages = empty_stages(self.nodes, flats.num_layers) if stats else None
        for buffer, g in zip(flats.buffers, flats.groups):
            if intra is not None:
                sum_over(buffer, intra, self._per_node)
            offsets = g.offsets.tolist()
            shares = split_layers(offsets, self._per_node)
            a, b = shares[self.local_rank]
            if b > a:
                share = DtypeGroup(g.dtype, tuple(range(b - a)), offsets_of([offsets[i + 1] - offsets[i] for i in range(a, b)]))
                part = across._reduce(Flats([buffer[offsets[a] : offsets[b]]], [share], b - a), stats)
                if stages is not None and part is not None:
                    for s, stage in enumerate(part.stages):
                        stages[s][:, :, list(g.layers[a:b])] = stage
            if intra is not None:
                self._gather_shares(buffer, [(offsets[x], offsets[y]) for x, y in shares], intra)
        if stages is None:
            return None
        if intra is not None and stages:
            # Each layer's numbers are on the one local rank that reduced it, zeros elsewhere:
            # the sum is an exact copy.
            packed = torch.cat([s.reshape(-1) for s in stages]).to(flats.buffers[0].device)
            dist.all_reduce(packed, group=intra)
            chunks = torch.split(packed.cpu(), [s.numel() for s in stages])
            stages = [chunk.view(s.shape) for chunk, s in zip(chunks, stages)]
        return _node_stats(stages, self._per_node)

    def _gather_shares(self, flat: torch.Tensor, ranges: list[tuple[int, int]], intra: dist.ProcessGroup) -> None:
        # Bytes, not values, travel: the copy is exact and independent of the backend's dtypes.
        size = flat.element_size()
        width = max(hi - lo for lo, hi in ranges) * size
        lo, hi = ranges[self.local_rank]
        mine = torch.zeros(width, dtype=torch.uint8, device=flat.device)
        mine[: (hi - lo) * size] = flat[lo:hi].view(torch.uint8)
        everyone = torch.empty(self._per_node * width, dtype=torch.uint8, device=flat.device)
        all_gather_single(everyone, mine, group=intra)
        raw = flat.view(torch.uint8)
        for j, (lo, hi) in enumerate(ranges):
            raw[lo * size : hi * size] = everyone[j * width : j * width + (hi - lo) * size]


def _node_stats(stages: Sequence[torch.Tensor], per_node: int) -> Stats:
    """Statistics of Adasum across nodes whose operands are averages of ``per_node`` ranks:
    the noise scale's batches are node batches, not rank batches."""
    moments = pair_moments(stages[0], per_node) if stages and stages[0].shape[0] else None
    return Stats(tuple(stages), moments=moments)
