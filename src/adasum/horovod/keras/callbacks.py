"""Horovod's Keras callbacks: start from one rank's weights, average the epoch's metrics over
the ranks, and schedule (warm up) the learning rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import torch

from adasum.horovod import _allreduce
from adasum.horovod._missing import not_offered
from adasum.horovod._reduce_ops import Average
from adasum.horovod._runtime import rank, size
from adasum.horovod.tensorflow._ops import broadcast_variables

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback", "LearningRateScheduleCallback",
           "LearningRateWarmupCallback", "BestModelCheckpoint"]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Give every rank ``root_rank``'s model and optimizer variables when training starts.

    Horovod broadcast at the end of the first batch (its optimizer's variables did not exist
    before). Keras 3 builds a model that knows its input shape, and the optimizer, before
    ``on_train_begin``, so for such a model the broadcast comes before the first batch and
    every rank takes its first step from the same weights. A model built by its first call
    (a ``Sequential`` without ``keras.Input``, a subclassed model) has no variables until the
    first step has run: its broadcast comes at the end of the first batch, as Horovod's did.
    Variables in ``local_variables`` keep each rank's value. ``device`` is accepted and not needed.
    """

    def __init__(self, root_rank: int, device: str = "", local_variables: Any = None) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.broadcast_done = False
        if local_variables is None:
            local_variables = []
        elif not isinstance(local_variables, (list, tuple)):
            local_variables = [local_variables]
        self._local = {id(v): v for v in local_variables}

    def register_local_var(self, var: Any) -> None:
        """Leave ``var`` out of the broadcast."""
        self._local[id(var)] = var

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.model.built:  # else its variables appear in the first step
            self._broadcast()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._broadcast()

    def _broadcast(self) -> None:
        if self.broadcast_done:
            return
        optimizer = self.model.optimizer
        if not optimizer.built:  # fit builds it first; a custom loop may call this earlier
            optimizer.build(self.model.trainable_variables)
        variables = [v for v in self.model.variables + optimizer.variables if id(v) not in self._local]
        broadcast_variables(variables, self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace every metric in the epoch's logs by its average over the ranks, for the
    callbacks after it (``ReduceLROnPlateau``, ``EarlyStopping``, checkpoints) to see the same
    numbers on every rank. Put it before them. One allreduce of all metrics (float64), in name
    order; ranks with different metrics raise :class:`adasum.horovod.MismatchError`.
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        names = sorted(logs)
        values = torch.tensor([float(logs[n]) for n in names], dtype=torch.float64)
        averaged = _allreduce.allreduce(values, op=Average, name="metrics:" + ",".join(names))
        for n, v in zip(names, averaged.tolist()):
            logs[n] = v


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Set the learning rate to ``initial_lr * multiplier(epoch)`` from ``start_epoch`` up to
    (not including) ``end_epoch``: once at each epoch's first batch (``staircase=True``) or at
    every batch with a fractional epoch (``staircase=False``, which needs ``steps_per_epoch``
    or fit's own count). A number as ``multiplier`` means ``multiplier ** (epoch - start_epoch)``.

    ``momentum_correction`` (Goyal et al. 2017): when the rate changes from r0 to r1, an SGD
    optimizer's velocity is scaled by r1 / r0, so that the momentum does not carry steps of the
    old size. Horovod scaled the ``momentum`` hyperparameter for that one batch; Keras 3 compiles
    it into the train step, so here the velocity itself is scaled (the same update without
    Nesterov; with ``nesterov=True``, and for optimizers other than SGD, nothing is corrected).
    """

    def __init__(self, initial_lr: float, multiplier: float | Callable[[float], float], start_epoch: int = 0,
                 end_epoch: int | None = None, staircase: bool = True, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None) -> None:
        super().__init__()
        if initial_lr is None:
            raise ValueError("initial_lr is required")
        self.initial_lr, self.start_epoch, self.end_epoch = float(initial_lr), start_epoch, end_epoch
        self.staircase, self.momentum_correction, self.steps_per_epoch = staircase, momentum_correction, steps_per_epoch
        self.multiplier = multiplier if callable(multiplier) else (lambda epoch: multiplier ** (epoch - start_epoch))
        self.current_epoch = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self.params.get("steps")
            if not self.steps_per_epoch:
                raise ValueError(f"{type(self).__name__}: pass steps_per_epoch (fit does not know the epoch's length)")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.current_epoch < self.start_epoch or (self.end_epoch is not None and self.current_epoch >= self.end_epoch):
            return
        if not self.staircase:
            assert self.steps_per_epoch is not None, "on_train_begin sets it for staircase=False"
            self._adjust(self.current_epoch + batch / self.steps_per_epoch)
        elif batch == 0:
            self._adjust(self.current_epoch)

    def _adjust(self, epoch: float) -> None:
        optimizer = self.model.optimizer
        old, new = _learning_rate(optimizer), self.initial_lr * self.multiplier(epoch)
        optimizer.learning_rate = new
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # adasum's wrapper steps this one
        if (self.momentum_correction and old != 0.0 and isinstance(inner, keras.optimizers.SGD)
                and inner.momentum and not inner.nesterov):
            for velocity in inner.momentums:
                velocity.assign(velocity * (new / old))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = _learning_rate(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Raise the learning rate gradually, batch by batch, from ``initial_lr / hvd.size()`` to
    ``initial_lr`` over the first ``warmup_epochs`` epochs (Goyal et al. 2017), reaching
    ``initial_lr`` at the end of the last warm-up epoch. With ``verbose`` rank 0 prints when
    the warm-up ends."""

    def __init__(self, initial_lr: float, warmup_epochs: int = 5, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None, verbose: int = 0) -> None:
        super().__init__(initial_lr, self._fraction, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.warmup_epochs, self.verbose = warmup_epochs, verbose

    def _fraction(self, epoch: float) -> float:
        # Counted at the batch's end, so that the last warm-up batch reaches initial_lr exactly.
        assert self.steps_per_epoch is not None, "on_train_begin sets it (warm-up is not a staircase)"
        done = (epoch + 1.0 / self.steps_per_epoch) / self.warmup_epochs
        n = size()
        return (1.0 + done * (n - 1)) / n

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.warmup_epochs - 1 and self.verbose and rank() == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to "
                  f"{_learning_rate(self.model.optimizer):g}.")


BestModelCheckpoint = not_offered(
    "adasum.horovod.keras.callbacks", "BestModelCheckpoint",
    "use keras.callbacks.ModelCheckpoint(path, save_best_only=True) on rank 0, after MetricAverageCallback")
