"""The Adasum reducer over a process group, and the one-call functions built on it.

Two algorithms compute the same reduction (the order of :mod:`adasum._order`):

* ``"vhdd"``: vector halving, distance doubling (:mod:`adasum._vhdd`), the bandwidth-optimal
  one: each rank sends 2 S (p-1)/p bytes, as a ring all-reduce does.
* ``"gather"``: one all-gather, then every rank runs the single-process reduction
  (:func:`adasum._reduce.reduce_rows`) on the same data with the same deterministic CPU
  kernels, so the results are again bit-identical, and equal to :func:`adasum.reduce`'s. Where
  latency, not bandwidth, decides (small buffers) it beats VHDD's 2 log2(p) rounds of messages.

``"auto"`` takes the gather for CPU buffers of at most :data:`GATHER_BYTES` per rank and VHDD
otherwise. CUDA buffers always take VHDD: CUDA reductions need not be deterministic, so ranks
computing the same reduction could disagree in the last bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from adasum import _vhdd
from adasum._check import Problem, Setting
from adasum._groups import all_gather_single
from adasum._layout import Flats
from adasum._p2p import Link
from adasum._plan import plan_of
from adasum._reduce import reduce, reduce_rows
from adasum._reducer import Reducer, Tensors
from adasum._stats import Stats, empty_stages

__all__ = ["Adasum", "all_reduce", "all_reduce_flat", "ALGORITHMS", "GATHER_BYTES"]

ALGORITHMS = ("auto", "vhdd", "gather")

#: Up to this many bytes per rank (and 8 times as many received), gathering every rank's
#: buffers and reducing them locally beats VHDD's rounds of messages; measured with Gloo on 2,
#: 4 and 8 ranks, where the two cross between 256 KiB and 1 MiB per rank.
GATHER_BYTES = 512 << 10


class Adasum(Reducer):
    """Adasum of every rank's tensors, per layer, in the order of rule 4, bit-identical on
    every rank.

    Args:
        group: the ranks to reduce over (default: the default group).
        algorithm: ``"auto"``, ``"vhdd"`` or ``"gather"`` (module docstring); the gather
            needs CPU tensors.
    """

    name = "adasum"

    def __init__(self, group: dist.ProcessGroup | None = None, *, algorithm: str = "auto") -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        super().__init__(group)
        self.algorithm = algorithm

    def setting(self) -> Setting:
        return super().setting() + (("algorithm", self.algorithm),)

    def reduce(self, per_rank, *, stats: bool = False):
        return reduce(per_rank, stats=stats)

    def _problem(self, tensors: Sequence[torch.Tensor]) -> Problem | None:
        if self.algorithm == "gather" and tensors and tensors[0].device.type != "cpu":
            return Problem(ValueError, f"algorithm='gather' needs CPU tensors, got {tensors[0].device}")
        return None

    def _idle_stats(self, num_layers: int) -> Stats:
        return Stats(tuple(empty_stages(dist.get_world_size(self.group), num_layers)))

    def _reduce(self, flats: Flats, stats: bool) -> Stats | None:
        if self._gathers(flats):
            return self._gather(flats, stats)
        plan = plan_of(dist.get_world_size(self.group), dist.get_rank(self.group))
        recorder = _vhdd.Recorder(plan, flats.num_layers, flats.buffers[0].device) if stats else None
        _vhdd.run(flats, plan, Link(self.group), lambda like, n: self._buffers.get("recv", like, n), recorder)
        return recorder.stats(self.group) if recorder is not None else None

    def _gathers(self, flats: Flats) -> bool:
        if self.algorithm != "auto":
            return self.algorithm == "gather"
        world = dist.get_world_size(self.group)
        per_rank = sum(f.numel() * f.element_size() for f in flats.buffers)
        small = per_rank <= GATHER_BYTES and (world - 1) * per_rank <= 8 * GATHER_BYTES
        return small and flats.buffers[0].device.type == "cpu"

    def _gather(self, flats: Flats, stats: bool) -> Stats | None:
        """Every rank gathers every rank's buffers and runs the single-process reduction."""
        world = dist.get_world_size(self.group)
        stages = empty_stages(world, flats.num_layers) if stats else None
        for flat, g in zip(flats.buffers, flats.groups):
            rows = self._buffers.get("gather", flat, world * flat.numel())
            if flat.numel():
                all_gather_single(rows, flat, group=self.group)
            rows = rows.view(world, flat.numel())
            reduce_rows(rows, g, stages)
            flat.copy_(rows[0])
        return Stats(tuple(stages)) if stages is not None else None


def all_reduce(
    tensors: Tensors,
    group: dist.ProcessGroup | None = None,
    *,
    stats: bool = False,
    algorithm: str = "auto",
) -> Stats | None:
    """Replace each rank's tensors by the Adasum of all ranks' tensors, in place.

    ``Adasum(group, algorithm=algorithm).all_reduce(tensors, stats=stats)``: see
    :class:`Adasum` and :meth:`adasum.Reducer.all_reduce`. Each tensor is one layer with its own
    dot products and norms, accumulated in float64; afterwards all ranks hold bit-identical
    values equal, up to float64 rounding of the dot products, to :func:`adasum.reduce` of all
    ranks' inputs. A loop calling this every step should keep one :class:`Adasum` instead,
    which reuses its buffers.
    """
    return Adasum(group, algorithm=algorithm).all_reduce(tensors, stats=stats)


def all_reduce_flat(
    buffer: torch.Tensor,
    numels: Sequence[int],
    group: dist.ProcessGroup | None = None,
    *,
    stats: bool = False,
    algorithm: str = "auto",
) -> Stats | None:
    """:func:`all_reduce` on one contiguous 1-D buffer holding layers of ``numels`` elements
    end to end (a DDP bucket, say), in place and without a packing copy."""
    return Adasum(group, algorithm=algorithm).all_reduce_flat(buffer, numels, stats=stats)
