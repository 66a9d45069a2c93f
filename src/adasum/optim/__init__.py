"""Optimizers for delta mode.

    DistributedOptimizer(opt, reducer)  each rank steps ``opt`` on its own gradients; the
                                        parameter deltas are reduced (with Adasum: how the
                                        paper trains with Adam and LAMB)
    local_delta(opt, params, start)     one worker's step as its parameter delta (delta mode's
                                        local half, for loops that simulate workers)
    broadcast_parameters(model)         make every rank start from rank 0's parameters
    Lamb(params)                        LAMB (You et al., 2019), which torch does not ship
"""

from adasum.optim._delta import local_delta
from adasum.optim._distributed import DistributedOptimizer, broadcast_parameters
from adasum.optim._lamb import Lamb

__all__ = ["DistributedOptimizer", "local_delta", "broadcast_parameters", "Lamb"]
