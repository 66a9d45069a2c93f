"""``hvd.elastic.ElasticSampler``: a dataset split over the ranks that, after a change of world,
splits only what the epoch has not processed yet.

The epoch's order is a permutation of the dataset's indices (``random.Random(seed +
epoch).shuffle``, the order Horovod's sampler uses, so a migrated script sees the same
batches). The indices not yet processed, in that order, are padded by repeating them from the
start until every rank gets the same number, and rank r takes every N-th from position r (as
``DistributedSampler`` does). ``record_batch(b, batch_size)`` marks batch b of every rank as
processed; every rank can compute all ranks' batches, so no message is needed.
``record_indices`` marks indices this rank names; the ranks' records are united at
``TorchState.commit()`` and ``sync()``. The partition is recomputed at ``set_epoch``,
``load_state_dict`` and ``reset``, never in the middle of an iteration.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist

from adasum.horovod._runtime import rank, size

__all__ = ["ElasticSampler"]


class ElasticSampler(torch.utils.data.Sampler[int]):
    """Partitions ``dataset`` (of constant length) over the ranks, and after a restart on a
    different number of ranks partitions only the indices the epoch has not processed.

    Use it as Horovod's: put it in the :class:`TorchState` (``sampler=...``), call
    :meth:`record_batch` after each batch, and :meth:`set_epoch` at the *end* of each epoch
    (it clears the record). ``hvd.init()`` must have run.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._processed = torch.zeros(len(dataset), dtype=torch.bool)
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: a new order (with ``shuffle``) and nothing processed."""
        self.epoch = epoch
        self._processed.zero_()
        self.reset()

    def reset(self) -> None:
        """Partition the unprocessed indices over the current ranks."""
        self.num_replicas, self.rank = size(), rank()
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        ordered = torch.tensor(order, dtype=torch.long)
        remaining = ordered[~self._processed[ordered]].tolist()
        self.num_samples = math.ceil(len(remaining) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        # Repeated from the start as often as needed (fewer remaining indices than ranks too).
        repeats = math.ceil(self.total_size / len(remaining)) if remaining else 0
        self._padded = (remaining * repeats)[: self.total_size]
        self.indices = self._padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.indices))

    def __len__(self) -> int:
        return self.num_samples

    def get_indices(self, batch_idx: int, batch_size: int) -> list[int]:
        """This rank's indices in batch ``batch_idx`` of ``batch_size``."""
        return self.indices[batch_idx * batch_size : (batch_idx + 1) * batch_size]

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Mark batch ``batch_idx`` of every rank as processed (every rank calls it for the
        same batch). Rank r's j-th index sits at position r + N j of the padded order, so
        batch b of all ranks is one stretch of it."""
        n = self.num_replicas
        end = min((batch_idx + 1) * batch_size, self.num_samples)
        self.record_indices(self._padded[n * batch_idx * batch_size : n * end])

    def record_indices(self, indices: Iterable[int]) -> None:
        """Mark ``indices`` as processed (this rank's record; the ranks' records are united at
        the state's commit and sync)."""
        self._processed[torch.as_tensor(list(indices), dtype=torch.long)] = True

    @property
    def processed_indices(self) -> set[int]:
        """The indices recorded as processed this epoch."""
        return set(torch.nonzero(self._processed).flatten().tolist())

    @property
    def processed_num(self) -> int:
        """How many distinct indices are recorded as processed this epoch (Horovod's counter
        also counted the padding's repeats)."""
        return int(self._processed.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "processed_indices": torch.nonzero(self._processed).flatten()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the epoch and the processed indices, and partition the rest over the current ranks."""
        self.epoch = state_dict["epoch"]
        self._processed.zero_()
        self._processed[torch.as_tensor(state_dict["processed_indices"], dtype=torch.long)] = True
        self.reset()

    def unite(self) -> None:
        """Make every rank's record the union of all ranks' (a collective), without changing
        the current partition."""
        mine = self._processed.to(torch.uint8)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        self._processed.copy_(mine.bool())
