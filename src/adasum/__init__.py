"""Adasum: adaptive summation of gradients or updates across data-parallel workers.

    adasum.combine(a, b)          the operator on one layer
    adasum.reduce(per_rank)       N ranks' tensors in one process (the reference)
    adasum.all_reduce(tensors)    the collective on torch.distributed, any world size

See ``adasum.ops`` for the math and ``adasum.order`` for the combination order.
"""

from adasum._collective import all_reduce, all_reduce_flat
from adasum._ops import combine
from adasum._reduce import TreeStats, reduce

__all__ = ["combine", "reduce", "all_reduce", "all_reduce_flat", "TreeStats"]
__version__ = "0.1.0"
