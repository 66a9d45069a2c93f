"""``hvd.elastic``: Horovod's elastic training API (``horovod.torch.elastic``) under torchrun.

    state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            for state.batch, batch in enumerate(loader): ...; state.commit()
            ...

    train(state)

Horovod reset its workers in place when a host was lost or added. Under ``torchrun
--nnodes=MIN:MAX`` the agents end the workers and start new ones on the new world, so the
last commit is written to ``$ADASUM_ELASTIC_DIR`` and :func:`run` continues from it when the
new workers start. What maps and what differs: docs/horovod.md, "Elastic training".
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from adasum.horovod._runtime import rank
from adasum.horovod.elastic._sampler import ElasticSampler
from adasum.horovod.elastic._state import DIR_VARIABLE, TorchState

__all__ = ["run", "TorchState", "ElasticSampler"]

R = TypeVar("R")


def run(func: Callable[..., R]) -> Callable[..., R]:
    """Decorate the training function ``func(state, *args, **kwargs)``.

    The decorated function loads the last commit from ``$ADASUM_ELASTIC_DIR`` if there is one
    (the workers were restarted: a rank was lost or added) and then runs the state's reset
    callbacks; then it makes every rank's state rank 0's (:meth:`TorchState.sync`) and calls
    ``func``. Every rank calls it, after ``hvd.init()``. A lost rank makes the others' next
    collective fail; the error ends the worker, and torchrun's agents restart the workers,
    which come back here.
    """

    @functools.wraps(func)
    def wrapper(state: TorchState, *args: Any, **kwargs: Any) -> R:
        if DIR_VARIABLE not in os.environ and "TORCHELASTIC_RUN_ID" in os.environ and rank() == 0:
            warnings.warn(
                f"adasum.horovod.elastic: ${DIR_VARIABLE} is not set, so commits stay in memory and workers "
                "that torchrun restarts begin again from the start", stacklevel=2,
            )
        if state.load_commit():
            state.on_reset()
        state.sync()
        return func(state, *args, **kwargs)

    return wrapper
