"""``hvd.DistributedOptimizer``: Horovod's optimizer wrapper, in its two modes.

* ``op=Average`` (the default), ``Sum``, ``Min``, ``Max`` or ``Product``: gradient mode. At
  :meth:`_GradientOptimizer.synchronize` (which ``step()`` calls unless told not to) every
  gradient is reduced over the ranks, in one fused call per dtype, and then the wrapped
  optimizer steps on the reduced gradients: the same update on every rank.
* ``op=Adasum``: delta mode, as Horovod's Adasum optimizer: every rank steps the wrapped
  optimizer on its own gradient, and the parameter deltas are combined with Adasum. This is
  :class:`adasum.optim.DistributedOptimizer` (any number of ranks; the optimizer steps once
  over all its parameters, so LAMB's trust ratios and other cross-parameter optimizers work).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from adasum._adasum import Adasum as _AdasumReducer
from adasum.horovod._allreduce import grouped_allreduce_async_
from adasum.horovod._reduce_ops import Adasum, Average, Compression, ReduceOp, resolve_op
from adasum.horovod._runtime import group_of
from adasum.optim import DistributedOptimizer as _DeltaBase
from adasum.optim._wrapper import Wrapper

__all__ = ["DistributedOptimizer"]


def _names(optimizer: torch.optim.Optimizer, named_parameters: Iterable | None) -> dict[int, str]:
    """Every parameter's name, by id, with Horovod's checks: (name, tensor) tuples, unique
    names, every parameter of the optimizer named."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return {id(p): f"allreduce.noname.{i}" for i, p in enumerate(params)}
    pairs = list(named_parameters)
    if any(not isinstance(pair, tuple) or len(pair) != 2 for pair in pairs):
        raise ValueError("named_parameters must be (name, parameter) tuples, as model.named_parameters() gives")
    counts = Counter(name for name, _ in pairs)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"parameter names in named_parameters must be unique; duplicates: {', '.join(duplicates)}")
    names = {id(p): name for name, p in pairs}
    unnamed = [i for i, p in enumerate(params) if id(p) not in names]
    if unnamed:
        raise ValueError(
            f"named_parameters does not name {len(unnamed)} of the optimizer's parameters "
            f"(positions {', '.join(map(str, unnamed[:5]))}{' ...' if len(unnamed) > 5 else ''})"
        )
    return names


class _GradientOptimizer(Wrapper):
    """Gradient mode: reduce the gradients, then step the wrapped optimizer (see
    :func:`DistributedOptimizer`). The wrapped optimizer owns the parameter groups and state,
    which this object exposes (so LR schedulers and ``state_dict`` work as on it)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, names: dict[int, str], compression: Any,
        backward_passes_per_step: int, op: ReduceOp, gradient_predivide_factor: float,
        sparse_as_dense: bool, process_set: dist.ProcessGroup | None,
    ) -> None:
        # torch.optim.Optimizer.__init__ is not called: the state stays the wrapped optimizer's.
        self.optimizer = optimizer
        self._names = names
        self._compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._synchronized = False
        self._should_synchronize = True

    def __repr__(self) -> str:
        return f"hvd.DistributedOptimizer({self.optimizer!r}, op={self.op.name})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        for p in self.optimizer.param_groups[-1]["params"]:
            self._names.setdefault(id(p), f"allreduce.noname.{len(self._names)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._synchronized = False
        super().load_state_dict(state_dict)

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Kept for Horovod's scripts: gradients are reduced once per step whatever the count."""
        self.backward_passes_per_step = int(passes)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def synchronize(self) -> None:
        """Replace every gradient by its reduction over the ranks (a missing gradient counts as
        zero, since another rank may have one). Call it before changing the gradients
        (clipping, unscaling), then step inside :meth:`skip_synchronize`."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        grads = [self._dense_grad(p) for p in params]
        compressed = [self._compression.compress(g) for g in grads]
        pre, post = (1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor) if self.op is Average else (1.0, 1.0)
        reduced = grouped_allreduce_async_([c for c, _ in compressed], op=self.op, prescale_factor=pre,
                                           postscale_factor=post, process_set=self.process_set).wait()
        with torch.no_grad():
            for p, out, (_, ctx) in zip(params, reduced, compressed):
                result = self._compression.decompress(out, ctx)
                if p.grad.is_sparse:
                    p.grad = result.to_sparse()
                elif result is not p.grad:
                    p.grad.copy_(result)
        self._synchronized = True

    def _dense_grad(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse and self.sparse_as_dense:
            return p.grad.to_dense()
        return p.grad  # a sparse gradient without sparse_as_dense: the agreement reports it

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside it, ``step()`` does not reduce the gradients (they were, by
        :meth:`synchronize`)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Reduce the gradients (unless inside :meth:`skip_synchronize`) and step. A closure is
        evaluated first (it computes the gradients), then the reduction, then the step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(
                    "hvd.DistributedOptimizer: step() after synchronize() reduces the gradients a "
                    "second time; step inside optimizer.skip_synchronize() after synchronize()",
                    stacklevel=2,
                )
            self.synchronize()
        self._synchronized = False
        self.optimizer.step()
        return loss


class _DeltaOptimizer(_DeltaBase):
    """Delta mode (``op=Adasum``): :class:`adasum.optim.DistributedOptimizer` with Horovod's
    ``synchronize`` and ``skip_synchronize``. The deltas are reduced inside ``step()``; the
    gradients stay this rank's own, so ``synchronize()`` has nothing to do, and clipping
    between it and ``step()`` clips this rank's gradient before its local step (Horovod's
    Adasum optimizer refused ``skip_synchronize``; here the usual clipping loop works)."""

    def synchronize(self) -> None:
        """Nothing to do in delta mode (see the class docstring)."""

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Accepted for Horovod's clipping loop; ``step()`` still combines the deltas."""
        yield

    def set_backward_passes_per_step(self, passes: int) -> None:
        if int(passes) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {passes}")
        self.backward_passes_per_step = int(passes)
        self._count_passes_of(p for group in self.optimizer.param_groups for p in group["params"])


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    compression: Any = Compression.none,
    backward_passes_per_step: int = 1,
    op: ReduceOp = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: object = None,
    sparse_as_dense: bool = False,
    process_set: dist.ProcessGroup | None = None,
    *,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` for data-parallel training, as Horovod's ``DistributedOptimizer``.

    With ``op=Average`` (default), ``Sum``, ``Min``, ``Max`` or ``Product`` the gradients are
    reduced over the ranks before the wrapped optimizer steps (gradient mode): ``step()``
    calls ``synchronize()`` first, unless called inside ``skip_synchronize()``, so a clipping
    or AMP loop reads::

        loss.backward()
        optimizer.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with optimizer.skip_synchronize():
            optimizer.step()

    With ``op=Adasum`` each rank steps the wrapped optimizer on its own gradients and the
    parameter deltas are combined with Adasum (delta mode, :class:`adasum.optim.DistributedOptimizer`,
    any number of ranks): every rank ends with the same parameters. ``step()`` before the
    ``backward_passes_per_step``-th backward pass does nothing (gradients accumulate), and
    ``grad_scaler=`` (an extension) makes a ``GradScaler``'s skipped steps agree over the ranks.

    Args:
        named_parameters: ``model.named_parameters()``; names must be unique and cover every
            parameter of the optimizer (ValueError otherwise, as in Horovod).
        compression: ``Compression.none`` or ``Compression.fp16`` (gradient mode only).
        backward_passes_per_step: backward passes accumulated per step. In gradient mode it
            does not change the result (Horovod's only delayed the start of the reduction).
        gradient_predivide_factor: gradients are divided by it before the sum and multiplied
            by it / size after (Average only).
        num_groups, groups: Horovod's fusion groups; accepted and not needed: all gradients
            are already reduced in one fused call per dtype.
        sparse_as_dense: reduce sparse gradients as dense ones (otherwise they are refused).
        process_set: None (every rank) or a ``torch.distributed`` group.
    """
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, (_GradientOptimizer, _DeltaBase)):
        raise TypeError(f"hvd.DistributedOptimizer wraps a torch.optim.Optimizer once, got {type(optimizer).__name__}")
    resolved, problem = resolve_op(op, None)
    if resolved is None:  # the same arguments on every rank: every rank raises here
        raise ValueError(f"hvd.DistributedOptimizer: {problem}")
    if int(backward_passes_per_step) <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if gradient_predivide_factor != 1.0 and resolved is not Average:
        raise ValueError("gradient_predivide_factor needs op=Average")
    group = group_of(process_set)
    names = _names(optimizer, named_parameters)
    if resolved is Adasum:
        if compression is not Compression.none:
            raise NotImplementedError(
                "hvd.DistributedOptimizer(op=Adasum) with compression: the deltas travel in the "
                "parameters' dtype; train in float16/bfloat16 to halve the bytes"
            )
        return _DeltaOptimizer(
            optimizer, _AdasumReducer(group), int(backward_passes_per_step), grad_scaler=grad_scaler,
            named_parameters=[(names[id(p)], p) for g in optimizer.param_groups for p in g["params"]],
        )
    if grad_scaler is not None:
        raise ValueError(
            "grad_scaler= is for op=Adasum; in gradient mode call optimizer.synchronize() before "
            "scaler.unscale_(optimizer), then scaler.step(optimizer) inside optimizer.skip_synchronize()"
        )
    return _GradientOptimizer(optimizer, names, compression, int(backward_passes_per_step), resolved,
                              float(gradient_predivide_factor), sparse_as_dense, group)
