"""What the training-stack front doors (adasum.lightning, adasum.accelerate, adasum.hf) share:
putting Adasum on the DistributedDataParallel module a framework built, in the mode the
optimizer asks for.

* Gradient mode: :func:`adasum.ddp.adasum_hook` replaces DDP's average of the ranks' gradients
  by their Adasum.
* Delta mode (the optimizer is an :class:`adasum.optim.DistributedOptimizer`): DDP must leave
  each rank its own gradient, so the hook is PyTorch's ``noop_hook`` (no communication, no
  division); the wrapper combines the ranks' parameter updates instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

from adasum.ddp import AdasumState, adasum_hook
from adasum.optim import DistributedOptimizer


def is_delta(optimizers: Iterable[torch.optim.Optimizer], who: str) -> bool:
    """Whether ``optimizers`` (each plain or inside a framework's wrapper that keeps it as
    ``.optimizer``, as Accelerate's does) are DistributedOptimizers; a mix is refused, since
    DDP has one hook for all parameters."""
    wrapped = [isinstance(o, DistributedOptimizer) or isinstance(getattr(o, "optimizer", None), DistributedOptimizer)
               for o in optimizers]
    if any(wrapped) and not all(wrapped):
        raise ValueError(f"{who}: either every optimizer is a DistributedOptimizer (delta mode) or none is "
                         "(gradient mode); DDP has one hook for all parameters")
    return any(wrapped)


def attach(ddp: DistributedDataParallel, *, delta: bool, state: AdasumState | None, who: str) -> AdasumState | None:
    """Register Adasum's hook on ``ddp`` (before its first backward pass): in gradient mode
    :func:`adasum_hook` with ``state`` (default a new ``AdasumState()``), which is returned; in
    delta mode ``noop_hook``, and None is returned (``state`` is refused: the
    DistributedOptimizer's reducer decides)."""
    if delta:
        if state is not None:
            raise ValueError(f"{who}: adasum_state is for gradient mode; in delta mode the DistributedOptimizer's "
                             "reducer combines the updates")
        ddp.register_comm_hook(None, noop_hook)
        return None
    state = state if state is not None else AdasumState()
    ddp.register_comm_hook(state, adasum_hook)
    return state
