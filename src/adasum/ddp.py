"""Gradient mode as a DistributedDataParallel communication hook.

::

    model = DDP(model)
    model.register_comm_hook(AdasumState(), adasum_hook)

replaces DDP's gradient averaging: each bucket's gradients become, per parameter, the reduction
of all ranks' local gradients by the state's reducer (:class:`adasum.Adasum` by default, in the
order of :func:`adasum.schedule`, bit-identical on every rank; :class:`adasum.Hierarchical`,
:class:`adasum.Average` and :class:`adasum.Sum` run through the same hook). Layer boundaries come
from the bucket's parameters, so each parameter gets its own dot products whatever the bucketing.

The result is NOT divided by the world size. Adasum of N equal gradients is that gradient (as an
average would be) and of N orthogonal ones their sum, so the step lies between what averaging and
summing would give: start from the learning rate tuned for one rank's batch (not scaled up by N
as for averaging), and see :class:`adasum.Stats` for where between the two a model sits.

On a DDP module that a framework built (Accelerate's ``prepare``, Ray Train's ``prepare_model``),
:func:`use_adasum` registers the hook that the optimizer's mode needs: this one in gradient mode,
PyTorch's ``noop_hook`` in delta mode (a :class:`adasum.optim.DistributedOptimizer`).
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations against the
# real dist.GradBucket and Future types, which string annotations would fail.
import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from adasum._adasum import Adasum
from adasum._background import Background
from adasum._reducer import Agreement, Reducer
from adasum._stats import Stats
from adasum.optim import DistributedOptimizer

__all__ = ["AdasumState", "adasum_hook", "use_adasum", "is_delta_mode"]

logger = logging.getLogger(__name__)


class AdasumState:
    """State of :func:`adasum_hook`.

    Args:
        reducer: what to reduce the gradients with (default :class:`adasum.Adasum` over the
            default group; its group must be DDP's).
        stats: record, at every synchronising backward pass, what each combination saw per
            layer, in :attr:`last_stats` (:class:`adasum.Stats`, layers named by parameter;
            ``last_stats.summary()`` gives floats for a logger). Never changes the gradients.
        named_parameters: ``model.named_parameters()`` to name the layers in the statistics
            (otherwise ``b{bucket}.{position}``).
        overlap: reduce buckets on a background thread so that communication overlaps the rest
            of the backward pass, as DDP's own all-reduce does. The thread talks over a process
            group of its own (same ranks and timeout, created by the first hook call), so its
            messages never interleave with DDP's or the training loop's on the reducer's group.

    :meth:`close` (or ``with``) ends the thread and frees the group and buffers. Pickling keeps
    the settings and the reducer's options and drops every process group, the names and the
    thread; an unpickled state reduces over the default group.
    """

    __slots__ = (
        "reducer", "stats", "overlap", "last_stats", "_names", "_pending", "_background", "_streams", "_agreed",
    )

    def __init__(
        self,
        reducer: Reducer | None = None,
        *,
        stats: bool = False,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        overlap: bool = True,
    ) -> None:
        self.reducer = reducer if reducer is not None else Adasum()
        self.stats = stats
        self.overlap = overlap
        self.last_stats: Stats | None = None
        self._names: dict[int, str] = {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        self._pending: list[tuple[Stats, list[str]]] = []
        self._background = Background(self.reducer, "adasum-ddp")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        #: The bucket layouts (with the settings) every rank has agreed on; see _reduce.
        self._agreed: dict[tuple, Agreement] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"reducer": self.reducer, "stats": self.stats, "overlap": self.overlap}

    def __setstate__(self, state: dict[str, Any]) -> None:
        logger.warning("AdasumState unpickled without its process group: it reduces over the default group")
        AdasumState.__init__(self, state["reducer"], stats=state["stats"], overlap=state["overlap"])

    def __enter__(self) -> "AdasumState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending buckets, end the background thread and free the buffers; destroy the
        thread's process group where that is safe (:meth:`adasum._background.Background.close`).
        The state stays usable: a later hook call starts the thread again."""
        self._background.close()
        self.reducer.close()

    @contextlib.contextmanager
    def _ordered(self, job: "_Bucket") -> Iterator[None]:
        """On the background thread, for a CUDA bucket: the bucket's device as the current one
        (a new thread starts on device 0) and a side stream of the state's as the current
        stream, made to wait for the gradients the autograd stream was still computing when
        the hook was called. A CPU bucket needs neither."""
        if job.ready is None:
            yield
            return
        device = job.buffer.device
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        stream = self._streams[device]
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(job.ready)
            yield

    def _reduce(self, job: "_Bucket", reducer: Reducer) -> torch.Tensor:
        # One agreement round per bucket layout, not per call. DDP checked at construction that
        # every rank has the same parameters, and it hands every rank the same buckets in the
        # same order, so a layout agreed once stays agreed: every rank takes the same branch.
        # A new layout (DDP rebuilds its buckets after the first step) is agreed anew.
        key = (job.index, tuple(job.numels), job.buffer.dtype, job.buffer.device, self.stats, reducer.setting())
        if key not in self._agreed:
            self._agreed[key] = reducer.check_flat(job.flat, job.numels, stats=self.stats)
        stats = reducer.all_reduce_flat(job.flat, job.numels, stats=self.stats, agreement=self._agreed[key])
        if stats is not None:
            self._record(job, stats)
        return job.buffer

    def _record(self, job: "_Bucket", stats: Stats) -> None:
        self._pending.append((stats, [self._names.get(key, f"b{job.index}.{k}") for k, key in enumerate(job.param_ids)]))
        if job.is_last:
            names = [n for _, layer_names in self._pending for n in layer_names]
            self.last_stats = Stats.concat([s for s, _ in self._pending]).named(names)
            self._pending = []


class _Bucket:
    """What the hook needs of a GradBucket, read on the autograd thread (the bucket object is
    only guaranteed valid during the hook call)."""

    __slots__ = ("buffer", "flat", "numels", "index", "is_last", "param_ids", "ready")

    def __init__(self, bucket: dist.GradBucket, overlap: bool) -> None:
        self.buffer = bucket.buffer()
        self.numels = [g.numel() for g in bucket.gradients()]
        # A bucket's buffer is its gradients end to end; any tail past them is not a gradient.
        self.flat = self.buffer[: sum(self.numels)]
        self.index = bucket.index()
        self.is_last = bucket.is_last()
        self.param_ids = [id(p) for p in bucket.parameters()]
        #: For a CUDA bucket reduced on the background thread: the point of the autograd
        #: stream (the current one here) after which the gradients are complete.
        self.ready: torch.cuda.Event | None = None
        if overlap and self.buffer.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(self.buffer.device))


def _future_for(buffer: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """A future for ``buffer`` once reduced. For a CUDA buffer it knows the device: completing
    it records an event on the completing thread's current stream, and DDP's wait on it makes
    DDP's stream wait for that event instead of reading an unfinished buffer."""
    if buffer.is_cuda:
        return torch.futures.Future(devices=[buffer.device])
    return torch.futures.Future()


def adasum_hook(state: AdasumState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Replace the bucket's flat gradient buffer by the per-parameter reduction of all ranks'.

    Returns a future holding the buffer, reduced in place. With ``state.overlap`` the reduction
    runs on the state's background thread and the future completes when it is done (DDP waits
    for it at the end of the backward pass); otherwise it runs here and the future is already
    complete. On CUDA the background thread works on a side stream that first waits for the
    autograd stream's gradients, and the future carries the side stream's completion to DDP's
    stream; nothing waits on the host except where the algorithm reads a value there.
    """
    if not isinstance(bucket, dist.GradBucket):
        # Compiled autograd's DDP (optimize_ddp="python_reducer") hands hooks (grad, param) pairs.
        raise TypeError(
            f"adasum_hook needs DDP's GradBucket, got {type(bucket).__name__}: compiled autograd's "
            "python_reducer is not supported; compile the model with the default optimize_ddp"
        )
    overlap = state.overlap and dist.get_world_size(state.reducer.group) > 1
    job = _Bucket(bucket, overlap)
    future = _future_for(job.buffer)
    if not overlap:
        # On CUDA everything runs on the autograd thread's current stream, in order.
        future.set_result(state._reduce(job, state.reducer))
        return future

    def run(worker: Reducer) -> None:
        try:
            with state._ordered(job):
                future.set_result(state._reduce(job, worker))
        except BaseException as e:  # reaches the backward pass through the future
            future.set_exception(e)  # type: ignore[arg-type]  # torch's stub says Tensor

    # Every member calls the hook at this point: the first call makes the thread's group.
    state._background.submit(run)
    return future


# -- a DDP module built by a framework ------------------------------------------------------


def is_delta_mode(optimizers: Iterable[torch.optim.Optimizer]) -> bool:
    """Whether ``optimizers`` (each plain or inside a framework's wrapper that keeps it as
    ``.optimizer``, as Accelerate's does) are :class:`adasum.optim.DistributedOptimizer`\\ s. A
    mix is refused: DDP has one hook for all parameters."""
    wrapped = [isinstance(o, DistributedOptimizer) or isinstance(getattr(o, "optimizer", None), DistributedOptimizer)
               for o in optimizers]
    if any(wrapped) and not all(wrapped):
        raise ValueError("adasum: either every optimizer is a DistributedOptimizer (delta mode) or none is "
                         "(gradient mode); DDP has one hook for all parameters")
    return any(wrapped)


def use_adasum(
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    *,
    adasum_state: AdasumState | None = None,
) -> AdasumState | None:
    """Put Adasum on the DistributedDataParallel module a framework built (Accelerate's
    ``prepare``, Ray Train's ``prepare_model``), before its first backward pass, in the mode the
    optimizers ask for:

    * gradient mode (no DistributedOptimizer): :func:`adasum_hook` with ``adasum_state``
      (default ``AdasumState()``), which is returned; close it when training is over;
    * delta mode (every optimizer a DistributedOptimizer, prepared or not): DDP must leave each
      rank its own gradient, so the hook is PyTorch's ``noop_hook`` (no communication, no
      division) and the wrapper combines the ranks' updates; returns None (``adasum_state`` is
      refused: the wrapper's reducer decides).

    A model that is not DistributedDataParallel is left alone (None) with one process (where
    frameworks hand back the plain module) and refused with several (FSDP: :mod:`adasum.fsdp`).
    """
    delta = is_delta_mode([optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers)
    if not isinstance(model, DistributedDataParallel):
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise TypeError(f"use_adasum: the model is a {type(model).__name__}, not DistributedDataParallel")
        return None
    if delta:
        if adasum_state is not None:
            raise ValueError("use_adasum: adasum_state is for gradient mode; in delta mode the DistributedOptimizer's "
                             "reducer combines the updates")
        model.register_comm_hook(None, noop_hook)
        return None
    state = adasum_state if adasum_state is not None else AdasumState()
    model.register_comm_hook(state, adasum_hook)
    return state
