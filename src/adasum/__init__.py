"""Adasum: adaptive summation of gradients or updates across data-parallel workers.

The engine, from the top down:

    adasum.Reducer                  the interface every front door calls: in place on a list of
                                    tensors or one flat buffer, over a process group
    adasum.Adasum(group)            Adasum, any world size, bit-identical on every rank
    adasum.Hierarchical(local_size) average inside nodes, Adasum across them
    adasum.Average(), adasum.Sum()  the baselines, through the same code
    adasum.all_reduce(tensors)      Adasum in one call
    adasum.reduce(per_rank)         N ranks' tensors in one process (the reference)
    adasum.combine(a, b)            the operator on one layer
    adasum.schedule(n), adasum.expression(n)   the combination order
    adasum.Stats                    what each combination saw, per layer

The front doors are the modules ``adasum.ddp`` (gradient mode, a DDP communication hook),
``adasum.optim`` (delta mode, an optimizer wrapper) and ``adasum.jax``; the program, the simulator
and the experiments are in ``adasum.lab`` (``pip install 'adasum[lab]'``).
"""

from adasum._adasum import Adasum, all_reduce, all_reduce_flat
from adasum._baselines import Average, Sum
from adasum._hierarchical import Hierarchical
from adasum._ops import combine
from adasum._order import expression, schedule
from adasum._reduce import reduce
from adasum._reducer import Reducer
from adasum._stats import Stats
from adasum._version import __version__

__all__ = [
    "Reducer",
    "Adasum",
    "Hierarchical",
    "Average",
    "Sum",
    "all_reduce",
    "all_reduce_flat",
    "reduce",
    "combine",
    "schedule",
    "expression",
    "Stats",
    "__version__",
]
