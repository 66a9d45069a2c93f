"""Adasum: adaptive summation of gradients or updates across data-parallel workers.

The engine, from the top down:

    adasum.Reducer                  the interface every front door calls: in place on a list of
                                    tensors or one flat buffer, over a process group
    adasum.Agreement                what Reducer.check returns: the ranks agreed, no second round
    adasum.Adasum(group)            Adasum, any world size, bit-identical on every rank
    adasum.Hierarchical(local_size) average inside nodes, Adasum across them
    adasum.Average(), adasum.Sum()  the baselines, through the same code
    adasum.all_reduce(tensors)      Adasum in one call
    adasum.reduce(per_rank)         N ranks' tensors in one process (the reference)
    adasum.combine(a, b)            the operator on one layer
    adasum.schedule(n), adasum.expression(n)   the combination order
    adasum.Stats                    what each combination saw, per layer
    adasum.NoiseScale               the gradient noise scale (Stats.noise_scale(batch))
    adasum.RunningNoiseScale        its smoothed estimate, for logging

The front doors are the modules ``adasum.ddp`` (gradient mode, a DDP communication hook),
``adasum.optim`` (delta mode, an optimizer wrapper), ``adasum.fsdp`` (FSDP2 and HSDP),
``adasum.tensorflow`` and ``adasum.keras`` (TensorFlow 2 and Keras 3), ``adasum.jax`` (JAX and
Optax) and ``adasum.horovod`` (Horovod's PyTorch, TensorFlow and Keras APIs); for training
stacks, ``adasum.lightning`` (``Trainer(strategy="adasum")``), ``adasum.hf`` (the Hugging Face
``Trainer``) and ``adasum.ddp.use_adasum`` (the DDP module Accelerate or Ray Train built);
``adasum.launch`` starts N local workers. The program, the simulator and the experiments are in ``adasum.lab``
(``pip install -e '.[lab]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adasum._version import __version__

# Where each public name lives. They are imported on first use (PEP 562), so that importing the
# package costs nothing and does not import torch: the ``adasum`` program (``adasum.lab``) can
# then say in one line what to install when its extra is missing, before torch complains.
_EXPORTS = {
    "Reducer": "adasum._reducer",
    "Agreement": "adasum._reducer",
    "Adasum": "adasum._adasum",
    "Hierarchical": "adasum._hierarchical",
    "Average": "adasum._baselines",
    "Sum": "adasum._baselines",
    "all_reduce": "adasum._adasum",
    "all_reduce_flat": "adasum._adasum",
    "reduce": "adasum._reduce",
    "combine": "adasum._ops",
    "schedule": "adasum._order",
    "expression": "adasum._order",
    "Stats": "adasum._stats",
    "NoiseScale": "adasum._noise",
    "RunningNoiseScale": "adasum._noise",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adasum' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from adasum._adasum import Adasum, all_reduce, all_reduce_flat
    from adasum._baselines import Average, Sum
    from adasum._hierarchical import Hierarchical
    from adasum._noise import NoiseScale, RunningNoiseScale
    from adasum._ops import combine
    from adasum._order import expression, schedule
    from adasum._reduce import reduce
    from adasum._reducer import Agreement, Reducer
    from adasum._stats import Stats
