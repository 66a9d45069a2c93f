r"""Delta mode overlapped with the backward pass: ``DistributedOptimizer(..., overlap=True)``.

The optimizer's parameters are cut into buckets of at most ``bucket_cap_mb`` megabytes, in
reverse order (roughly the order in which backward produces their gradients, as DDP does). A
hook on each parameter (``register_post_accumulate_grad_hook``) sees its gradient become final
in the last backward pass of an update. When all of a bucket's gradients are final, on the
autograd thread, the wrapped optimizer steps that bucket's parameters alone and their deltas
:math:`\delta = \mathrm{opt}(x, g) - x` go to the bucket's flat buffer; a background thread
(:class:`adasum._background.Background`) reduces the bucket's deltas and sets
:math:`x \leftarrow x + R(\delta_0, \ldots, \delta_{N-1})` while backward continues.
:meth:`Overlap.finish` (called by ``step()``) steps the buckets whose gradients never became
final (parameters unused in the last pass, frozen ones), waits for every reduction, and the
update is complete.

Why it is the whole-model step: for an optimizer whose update of a parameter reads only that
parameter, its gradient and its state (SGD with or without momentum, Adam, AdamW, and LAMB,
whose trust ratio is per tensor: :data:`PER_PARAMETER`), stepping a bucket is the whole step
restricted to the bucket, so deltas and optimizer state are bit-identical to the whole-model
step's. The reduction is per layer too, and its result for a layer does not depend on the other
layers in the buffer with ``Adasum(algorithm="gather")`` or with :class:`adasum.Sum` and
:class:`adasum.Average` over two ranks: there the parameters are bit-identical as well. VHDD
halves its buffer by element count, so a layer cut at another place sums its float64 dot
products in other pieces: the result agrees to that rounding (as VHDD agrees with
:func:`adasum.reduce`). Optimizers that look across parameters (a global norm) are refused.

Buckets are reduced in index order on every rank (a bucket ready early waits for those before
it), which keeps the ranks' messages paired. The ranks agree on the parameters and options once
per update, when the first final gradient arrives and before anything changes, in the same
round as the whole-model step's (``DistributedOptimizer._check``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import torch

from adasum._background import Background
from adasum._reducer import Reducer
from adasum.optim._lamb import Lamb

__all__ = ["Overlap", "PER_PARAMETER", "overlap_problem"]

#: Optimizers whose update of a parameter reads only that parameter's gradient and state
#: (exactly these classes: a subclass may override ``step``).
PER_PARAMETER: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, Lamb)


def overlap_problem(optimizer: torch.optim.Optimizer, stats: bool = False, bucket_cap_mb: float = 1.0) -> str | None:
    """Why ``DistributedOptimizer(optimizer, stats=stats, overlap=True,
    bucket_cap_mb=bucket_cap_mb)`` cannot step bucket by bucket, or None."""
    if stats:
        return "overlap=True does not record stats (they need the gradients before any step): use overlap=False"
    if not bucket_cap_mb > 0:
        return f"bucket_cap_mb must be > 0, got {bucket_cap_mb}"
    if type(optimizer) not in PER_PARAMETER:
        names = ", ".join(c.__name__ for c in PER_PARAMETER)
        return (f"overlap=True steps the parameters bucket by bucket, which equals one step of the whole model "
                f"only for optimizers that update each parameter on its own ({names}); "
                f"{type(optimizer).__name__} may look across parameters: use overlap=False")
    devices = {p.device.type for group in optimizer.param_groups for p in group["params"]}
    if devices - {"cpu"}:
        return f"overlap=True supports CPU parameters only, got {', '.join(sorted(devices - {'cpu'}))}"
    return None


class _Bucket:
    """Parameters of one dtype stepped and reduced together: their values before the step and
    one flat buffer whose views (one per parameter, end to end) receive the deltas, so that the
    reducer works on them in place, without packing them first."""

    __slots__ = ("params", "by_group", "start", "deltas", "waiting", "stepped")

    def __init__(self, params: list[torch.Tensor], groups: list[set[int]]) -> None:
        self.params = params
        #: The bucket's parameters of each parameter group of the optimizer, in its order.
        self.by_group = [[p for p in params if id(p) in g] for g in groups]
        self.start = [torch.empty_like(p) for p in params]
        flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.deltas = [d.view(p.shape) for d, p in zip(flat.split([p.numel() for p in params]), params)]
        self.waiting = 0  # gradients of this update still to come
        self.stepped = False


def _buckets(params: Sequence[torch.Tensor], groups: list[set[int]], cap: int) -> list[_Bucket]:
    """The parameters in reverse order, cut into buckets of one dtype and at most ``cap`` bytes
    (a larger parameter has one of its own); parameters without gradients go last."""
    ordered = [p for p in reversed(params) if p.requires_grad] + [p for p in params if not p.requires_grad]
    out: list[list[torch.Tensor]] = []
    size = cap
    for p in ordered:
        nbytes = p.numel() * p.element_size()
        last = out[-1][-1] if out else p
        if size + nbytes > cap or p.dtype != last.dtype or p.requires_grad != last.requires_grad:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return [_Bucket(b, groups) for b in out]


@contextlib.contextmanager
def _restricted(optimizer: torch.optim.Optimizer, by_group: list[list[torch.Tensor]]) -> Iterator[None]:
    """The optimizer's parameter groups hold only the given parameters (and keep their
    hyperparameters and the shared state) until the block ends."""
    kept = [group["params"] for group in optimizer.param_groups]
    try:
        for group, params in zip(optimizer.param_groups, by_group):
            group["params"] = params
        yield
    finally:
        for group, params in zip(optimizer.param_groups, kept):
            group["params"] = params


class Overlap:
    """The hooks, buckets and background thread of an overlapped :class:`DistributedOptimizer`.

    Args:
        optimizer: the wrapped optimizer (one of :data:`PER_PARAMETER`).
        reducer: what reduces the deltas; the background thread uses it on a group of its own.
        cap: the most bytes of parameters in one bucket.
        final: whether a parameter's gradient is final (the last pass of an update) when its
            hook runs.
        agree: the ranks' agreement on the parameters and options; raises on a mismatch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        reducer: Reducer,
        cap: int,
        final: Callable[[torch.Tensor], bool],
        agree: Callable[[], object],
    ) -> None:
        self.optimizer = optimizer
        self.cap = cap
        self._final = final
        self._agree = agree
        self._background = Background(reducer, "adasum-delta")
        self._params: list[torch.Tensor] = []
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._hooked: set[int] = set()
        self._futures: list[Future[None]] = []
        self._launched = 0
        self._in_update = False

    def hook(self, params: Sequence[torch.Tensor]) -> None:
        """Watch the gradients of ``params`` (parameters already watched are skipped). The hook
        holds this object weakly: a dropped optimizer leaves inert hooks behind."""
        ref = weakref.ref(self)
        for p in params:
            if p.requires_grad and id(p) not in self._hooked:
                self._hooked.add(id(p))
                p.register_post_accumulate_grad_hook(lambda param, ref=ref: _call(ref, param))

    # -- during backward ----------------------------------------------------------------------

    def gradient_ready(self, param: torch.Tensor) -> None:
        """The hook: a bucket whose gradients are all final is stepped and its reduction
        queued."""
        if not self._final(param):
            return
        try:
            if not self._in_update:
                self._begin()
            bucket = self._bucket_of[id(param)]
            if bucket.stepped:
                raise RuntimeError(
                    "DistributedOptimizer(overlap=True): a gradient arrived after its bucket was stepped; "
                    "call step() after the last backward pass of each update, before the next backward pass"
                )
            bucket.waiting -= 1
            if bucket.waiting == 0:
                self._step(bucket)
                self._launch()
        except BaseException:
            self._abort()
            raise

    def _begin(self) -> None:
        """The first final gradient of an update: agree with the other ranks, then count the
        gradients each bucket waits for."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)):
            groups = [{id(p) for p in group["params"]} for group in self.optimizer.param_groups]
            self._params = params
            self._buckets = _buckets(params, groups, self.cap)
            self._bucket_of = {id(p): b for b in self._buckets for p in b.params}
        for bucket in self._buckets:
            bucket.waiting = sum(id(p) in self._hooked for p in bucket.params)
            bucket.stepped = False
        self._futures, self._launched = [], 0
        self._agree()  # raises on every rank alike, before anything changes
        self._in_update = True

    def _step(self, bucket: _Bucket) -> None:
        """The wrapped optimizer's step of the bucket alone; the deltas go to its buffer."""
        with torch.no_grad():
            torch._foreach_copy_(bucket.start, [p.detach() for p in bucket.params])
        with _restricted(self.optimizer, bucket.by_group):
            self.optimizer.step()
        with torch.no_grad():
            for p, start, delta in zip(bucket.params, bucket.start, bucket.deltas):
                torch.sub(p.detach(), start, out=delta)
        bucket.stepped = True

    def _launch(self) -> None:
        """Queue the reductions of the stepped buckets that come next in index order."""
        while self._launched < len(self._buckets) and self._buckets[self._launched].stepped:
            bucket = self._buckets[self._launched]
            self._futures.append(self._background.submit(functools.partial(_reduce, bucket=bucket)))
            self._launched += 1

    # -- in step() ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Step the buckets still waiting, wait for every reduction: the update is done. On an
        error every parameter is left as it was before the update, and it is raised."""
        if not self._in_update:
            self._begin()
        try:
            for bucket in self._buckets:
                if not bucket.stepped:
                    self._step(bucket)
            self._launch()
        except BaseException:
            self._abort()
            raise
        error = self._wait()
        if error is not None:
            self._restore()
        self._in_update = False
        if error is not None:
            raise error

    def _wait(self) -> BaseException | None:
        """Wait for every queued reduction; the first error, if any."""
        errors = [f.exception() for f in self._futures]
        return next((e for e in errors if e is not None), None)

    def _restore(self) -> None:
        """Every stepped bucket's parameters back to their values before the update."""
        for bucket in self._buckets:
            if bucket.stepped:
                with torch.no_grad():
                    torch._foreach_copy_([p.detach() for p in bucket.params], bucket.start)

    def _abort(self) -> None:
        self._wait()
        self._restore()
        self._in_update = False

    def close(self) -> None:
        """End the background thread and free its group and buffers (a later update starts it
        again)."""
        self._background.close()


def _call(ref: weakref.ref[Overlap], param: torch.Tensor) -> None:
    overlap = ref()
    if overlap is not None:
        overlap.gradient_ready(param)


def _reduce(worker: Reducer, bucket: _Bucket) -> None:
    """On the background thread: reduce the bucket's deltas, then x = start + reduced delta.
    The ranks agreed on all parameters before the update; a bucket is a part every rank cuts
    alike, so that agreement covers it."""
    worker.all_reduce(bucket.deltas, agreement=worker.agreement(bucket.deltas))
    with torch.no_grad():
        for p, start, delta in zip(bucket.params, bucket.start, bucket.deltas):
            torch.add(start, delta, out=p.detach())
