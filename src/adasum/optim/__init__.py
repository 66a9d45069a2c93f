"""Optimizers for Adasum's delta mode.

    DistributedOptimizer(opt)   each rank steps ``opt`` on its own gradients; the parameter
                                deltas are combined with Adasum (how the paper trains with Adam
                                and LAMB)
    broadcast_parameters(model) make every rank start from rank 0's parameters
    Lamb(params)                LAMB (You et al., 2019), which torch does not ship
"""

from adasum.optim.distributed import DistributedOptimizer, broadcast_parameters
from adasum.optim.lamb import Lamb

__all__ = ["DistributedOptimizer", "broadcast_parameters", "Lamb"]
