"""Adasum under Hugging Face Accelerate: the hook goes on the model ``prepare`` returns.

::

    from adasum.accelerate import use_adasum
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    use_adasum(model, optimizer)                        # before the first backward pass

(``pip install 'adasum[accelerate]'``; this module does not import Accelerate.) With several
processes ``prepare`` wraps the model in DistributedDataParallel, and PyTorch's
``register_comm_hook`` on that wrapper is the way in: Accelerate's own
``DistributedDataParallelKwargs(comm_hook=...)`` takes only the members of its enum of PyTorch's
built-in hooks, and ``Accelerator`` refuses a subclass of that handler (accelerate 1.16 looks
handlers up by their exact class).

The mode follows the optimizer:

* gradient mode (any optimizer but a DistributedOptimizer): each synchronising backward pass
  replaces DDP's average of the ranks' gradients g_r by Adasum(g_0, ..., g_{N-1}) per
  parameter (or what ``adasum_state``'s reducer computes); the optimizer steps on that, the
  same on every rank;
* delta mode (the optimizer given to ``prepare`` is an :class:`adasum.optim.DistributedOptimizer`):
  DDP gets PyTorch's ``noop_hook``, so each rank keeps its own gradient; each rank steps its own
  optimizer and the wrapper sets params = old + Adasum(d_0, ..., d_{N-1}) of the ranks' deltas.

Neither divides by the world size: keep the learning rate tuned for one rank's batch.
``accelerator.accumulate(model)`` works in both modes: it skips DDP's synchronisation (gradient
mode: the hook reduces the accumulated gradient once) and the optimizer's step on all but the
last pass, so in delta mode keep ``backward_passes_per_step=1``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adasum._stacks import attach, is_delta
from adasum.ddp import AdasumState

__all__ = ["use_adasum"]


def use_adasum(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, adasum_state: AdasumState | None = None
) -> AdasumState | None:
    """Put Adasum on ``model`` as ``accelerator.prepare`` returned it, in the mode ``optimizer``
    (prepared or not) asks for (module docstring). Call it once, before the first backward pass.

    Args:
        model: the prepared model: DistributedDataParallel, or with one process the plain
            module (left alone). Anything else with several processes (FSDP, DeepSpeed) is refused:
            for FSDP2 see :mod:`adasum.fsdp`.
        optimizer: the prepared optimizer: delta mode when it is a DistributedOptimizer.
        adasum_state: the hook's state in gradient mode (default ``AdasumState()``; e.g.
            ``AdasumState(adasum.Hierarchical(8))``, ``AdasumState(stats=True)``). Refused in
            delta mode, where the wrapper's reducer decides.

    Returns the state in use (gradient mode; close it when training is over to end its thread),
    or None (delta mode, or one process).
    """
    delta = is_delta([optimizer], "adasum.accelerate")
    if not isinstance(model, DistributedDataParallel):
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise TypeError(f"adasum.accelerate: the prepared model is a {type(model).__name__}, not the "
                            "DistributedDataParallel this hook goes on")
        return None
    return attach(model, delta=delta, state=adasum_state, who="adasum.accelerate")
