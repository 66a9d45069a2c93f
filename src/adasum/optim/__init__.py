"""Optimizers for delta mode.

    DistributedOptimizer(opt, reducer)  each rank steps ``opt`` on its own gradients; the
                                        parameter deltas are reduced (with Adasum: how the
                                        paper trains with Adam and LAMB)
    LocalSGD(opt, sync_every=H, outer=None)
                                        local SGD: H local steps between reductions of the
                                        deltas; with an outer optimizer, DiLoCo
    local_delta(opt, params, start)     one worker's step as its parameter delta (delta mode's
                                        local half, for loops that simulate workers)
    broadcast_parameters(model)         make every rank start from rank 0's parameters
    rank_state(states, rank)            the saved per-rank state a rank resumes from on any
                                        number of ranks: old rank ``rank mod len(states)``'s
    Lamb(params)                        LAMB (You et al., 2019), which torch does not ship
"""

from adasum.optim._delta import local_delta
from adasum.optim._distributed import DistributedOptimizer, broadcast_parameters
from adasum.optim._elastic import rank_state
from adasum.optim._lamb import Lamb
from adasum.optim._local import LocalSGD

__all__ = ["DistributedOptimizer", "LocalSGD", "local_delta", "broadcast_parameters", "Lamb", "rank_state"]
