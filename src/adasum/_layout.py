"""How a list of tensors is packed into one flat buffer per dtype.

Every backend combines layers per dtype in flat buffers: one kernel call or one message covers
all layers of a dtype, and the offsets keep each layer's dot products apart.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch
import torch.distributed as dist

from adasum._ops import offsets_of

__all__ = ["Layout", "DtypeGroup", "Flats"]


@dataclass(frozen=True)
class DtypeGroup:
    """The layers of one dtype: their positions in the input list and their offsets in the
    group's flat buffer."""

    dtype: torch.dtype
    layers: tuple[int, ...]
    offsets: torch.Tensor  # CPU int64, len(layers) + 1

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes of a list of tensors, in order."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> Layout:
        """The layout of ``tensors`` (checked by the caller: see :mod:`adasum._check`)."""
        return _cached(tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors))

    @classmethod
    def of_flat(cls, numels: tuple[int, ...], dtype: torch.dtype) -> Layout:
        """The layout of a flat buffer holding 1-D layers of ``numels`` elements end to end."""
        return _cached(tuple((n,) for n in numels), (dtype,) * len(numels))

    def __len__(self) -> int:
        return len(self.shapes)

    @cached_property
    def groups(self) -> tuple[DtypeGroup, ...]:
        """One group per dtype, in order of first appearance."""
        order: dict[torch.dtype, list[int]] = {}
        for i, dtype in enumerate(self.dtypes):
            order.setdefault(dtype, []).append(i)
        return tuple(
            DtypeGroup(dtype, tuple(idx), offsets_of([math.prod(self.shapes[i]) for i in idx]))
            for dtype, idx in order.items()
        )

    def chunks(self, max_numel: int) -> list[DtypeGroup]:
        """The dtype groups cut into runs of consecutive layers of at most ``max_numel`` elements
        (a larger layer is a run of its own). Layers are independent, so a reducer may work
        through the runs one at a time in a buffer of bounded size."""
        runs = []
        for g in self.groups:
            sizes = (g.offsets[1:] - g.offsets[:-1]).tolist()
            start = 0
            while start < len(sizes):
                stop, total = start + 1, sizes[start]
                while stop < len(sizes) and total + sizes[stop] <= max_numel:
                    total += sizes[stop]
                    stop += 1
                runs.append(DtypeGroup(g.dtype, g.layers[start:stop], offsets_of(sizes[start:stop])))
                start = stop
        return runs

    @cached_property
    def signature(self) -> int:
        """A hash of the layout that is stable across processes (a signed 63-bit integer)."""
        text = ";".join(f"{d}:{s}" for d, s in zip(self.dtypes, self.shapes)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1

    def describe(self, i: int) -> str:
        return f"{tuple(self.shapes[i])} {str(self.dtypes[i]).removeprefix('torch.')}"

    def pack(
        self, tensors: list[torch.Tensor], group: DtypeGroup, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The group's tensors end to end in ``out`` (a 1-D tensor of ``group.numel``
        elements) or in a new buffer."""
        parts = [tensors[i].reshape(-1) for i in group.layers]
        if out is None:
            device = parts[0].device if parts else None
            out = torch.empty(group.numel, dtype=group.dtype, device=device)
        if parts:
            torch.cat(parts, out=out)
        return out

    def unpack(self, flat: torch.Tensor, tensors: list[torch.Tensor], group: DtypeGroup) -> None:
        """Copy a flat buffer back into the group's tensors (in place)."""
        for k, i in enumerate(group.layers):
            lo, hi = int(group.offsets[k]), int(group.offsets[k + 1])
            tensors[i].copy_(flat[lo:hi].view(self.shapes[i]))


@dataclass
class Flats:
    """The buffers being reduced: one flat buffer per dtype and where its layers lie.

    With ``shards``, every rank's buffers are its shards of longer vectors, the other shards
    being held by the ranks of that group (HSDP's shard group): the algorithms then sum the
    per-layer partials over it (:func:`adasum._vhdd.totals`), so that the dot products span
    whole layers. This class only says where the layers lie; it sends nothing.
    """

    buffers: Sequence[torch.Tensor]
    groups: Sequence[DtypeGroup]
    num_layers: int
    shards: dist.ProcessGroup | None = None
    layer_ids: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        device = self.buffers[0].device
        self.layer_ids = [torch.tensor(g.layers, dtype=torch.int64, device=device) for g in self.groups]

    def partials_row(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-dtype ``[3, segments of the dtype]`` partials as one ``[3, num_layers]`` row,
        this rank's alone. A group's segments are usually its layers, one each; a layer cut
        into several segments (a sharded parameter, one segment per shard) gets the sum of its
        segments' partials."""
        row = torch.zeros(3, self.num_layers, dtype=torch.float64, device=self.buffers[0].device)
        for ids, part in zip(self.layer_ids, parts):
            row.index_add_(1, ids, part.to(row.device))
        return row



# Training asks for the same layout every step: offsets are built once per layout.
@lru_cache(maxsize=256)
def _cached(shapes: tuple, dtypes: tuple) -> Layout:
    return Layout(shapes, dtypes)
