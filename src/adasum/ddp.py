"""Gradient mode as a DistributedDataParallel communication hook.

::

    model = DDP(model)
    model.register_comm_hook(AdasumState(), adasum_hook)

replaces DDP's gradient averaging: each bucket's gradients become, per parameter, the Adasum of
all ranks' local gradients (order of :mod:`adasum.order`), bit-identical on every rank. Layer
boundaries come from the bucket's parameters, so each parameter gets its own dot products
whatever the bucketing.

The result is NOT divided by the world size. Adasum of N equal gradients is that gradient (as an
average would be) and of N orthogonal ones their sum, so the step lies between what averaging and
summing would give: start from the learning rate tuned for one rank's batch (not scaled up by N
as for averaging), and see :mod:`adasum.diagnostics` for where between the two a model sits.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations against the
# real dist.GradBucket and Future types, which string annotations would fail.
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch
import torch.distributed as dist

from adasum._collective import all_reduce_flat
from adasum._stats import concat_layers, summarize
from adasum._hierarchical import Hierarchy
from adasum._reduce import TreeStats

__all__ = ["AdasumState", "adasum_hook"]

logger = logging.getLogger(__name__)


class AdasumState:
    """State of :func:`adasum_hook`.

    Args:
        process_group: the ranks to combine over (default: DDP's, i.e. the world).
        diagnostics: record how orthogonal the ranks' gradients were at every synchronising
            backward pass, per layer and tree level, in :attr:`last_diagnostics` (a dict of
            floats, see :func:`adasum.diagnostics.summarize`); one small all-gather per bucket
            when on, nothing when off.
        named_parameters: ``model.named_parameters()`` to key the diagnostics by parameter name
            (otherwise keys are ``b{bucket}.{position}``).
        hierarchy: a :class:`adasum.hierarchical.Hierarchy` to average inside nodes and apply
            Adasum across nodes instead (combined on the autograd thread, blocking).
        overlap: combine buckets on a background thread so that communication overlaps the rest
            of the backward pass, as DDP's own allreduce does. The thread talks over a process
            group of its own (same ranks, created by the first hook call), so its messages never
            interleave with DDP's or the training loop's collectives on ``process_group``.

    Pickling keeps the settings and drops the process group, the hierarchy, the names and the
    thread (they do not survive a process boundary); an unpickled state combines over the
    default group.
    """

    __slots__ = (
        "process_group",
        "diagnostics",
        "hierarchy",
        "overlap",
        "last_diagnostics",
        "_names",
        "_pending",
        "_comm_group",
        "_executor",
    )

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        diagnostics: bool = False,
        named_parameters: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
        hierarchy: Optional[Hierarchy] = None,
        overlap: bool = True,
    ) -> None:
        self.process_group = process_group
        self.diagnostics = diagnostics
        self.hierarchy = hierarchy
        self.overlap = overlap
        self.last_diagnostics: dict[str, float] = {}
        self._names: dict[int, str] = (
            {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        )
        self._pending: list[tuple[TreeStats, list[str]]] = []
        self._comm_group: Optional[dist.ProcessGroup] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"diagnostics": self.diagnostics, "overlap": self.overlap}

    def __setstate__(self, state: dict[str, Any]) -> None:
        logger.warning(
            "AdasumState unpickled without its process group: it combines over the default group"
        )
        self.__init__(None, diagnostics=state["diagnostics"], overlap=state["overlap"])

    def _background(self) -> tuple[ThreadPoolExecutor, dist.ProcessGroup]:
        if self._executor is None:
            ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
            # Only the group's members meet here (in their first hook call), hence local sync.
            self._comm_group = dist.new_group(ranks, use_local_synchronization=True)
            # One thread: buckets are combined in the order DDP hands them over, the same on
            # every rank, which is what keeps the ranks' messages paired.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adasum-ddp")
        return self._executor, self._comm_group

    def _combine(self, job: "_Bucket", group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        if self.hierarchy is not None:
            stats = self.hierarchy.all_reduce_flat(job.flat, job.numels, stats=self.diagnostics)
        else:
            stats = all_reduce_flat(job.flat, job.numels, group, stats=self.diagnostics)
        if stats is not None:
            self._record(job, stats)
        return job.buffer

    def _record(self, job: "_Bucket", stats: TreeStats) -> None:
        names = [self._names.get(key, f"b{job.index}.{k}") for k, key in enumerate(job.param_ids)]
        self._pending.append((stats, names))
        if job.is_last:
            self.last_diagnostics = summarize(
                concat_layers([s for s, _ in self._pending]),
                [n for _, layer_names in self._pending for n in layer_names],
            )
            self._pending = []


class _Bucket:
    """What the hook needs of a GradBucket, read on the autograd thread (the bucket object is
    only guaranteed valid during the hook call)."""

    __slots__ = ("buffer", "flat", "numels", "index", "is_last", "param_ids")

    def __init__(self, bucket: dist.GradBucket) -> None:
        self.buffer = bucket.buffer()
        self.numels = [g.numel() for g in bucket.gradients()]
        # A bucket's buffer is its gradients end to end; any tail past them is not a gradient.
        self.flat = self.buffer[: sum(self.numels)]
        self.index = bucket.index()
        self.is_last = bucket.is_last()
        self.param_ids = [id(p) for p in bucket.parameters()]


def adasum_hook(state: AdasumState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Replace the bucket's flat gradient buffer by the per-parameter Adasum of all ranks'.

    Returns a future holding the buffer, combined in place. With ``state.overlap`` (and no
    hierarchy) the combination runs on the state's background thread and the future completes
    when it is done (DDP waits for it at the end of the backward pass); otherwise it runs here
    and the future is already complete.
    """
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    job = _Bucket(bucket)
    overlap = state.overlap and state.hierarchy is None and dist.get_world_size(state.process_group) > 1
    if not overlap:
        future.set_result(state._combine(job, state.process_group))
        return future
    executor, group = state._background()

    def run() -> None:
        try:
            future.set_result(state._combine(job, group))
        except BaseException as e:  # reaches the backward pass through the future
            future.set_exception(e)

    executor.submit(run)
    return future
