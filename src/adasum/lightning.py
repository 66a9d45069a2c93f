"""Adasum as a PyTorch Lightning strategy: ``Trainer(strategy="adasum")``.

::

    import adasum.lightning                       # registers the names "adasum" and "adasum_spawn"
    trainer = L.Trainer(strategy="adasum", accelerator="cpu", devices=4)
    trainer = L.Trainer(strategy=AdasumStrategy(adasum_state=AdasumState(adasum.Hierarchical(8))), ...)

(``pip install -e '.[lightning]'``). :class:`AdasumStrategy` is Lightning's ``DDPStrategy``
with :mod:`adasum.ddp`'s hook on the DistributedDataParallel module it builds, on every device.
(``DDPStrategy(ddp_comm_hook=...)`` registers a hook on CUDA devices only, lightning 2.6; on the
CPU it drops it without a word and DDP averages.) The mode follows the optimizers that
``configure_optimizers`` returns, so the hook goes on once they exist, at the end of ``setup``:

* Gradient mode (no :class:`~adasum.optim.DistributedOptimizer`): each synchronising backward
  pass replaces DDP's average of the ranks' gradients g_r by Adasum(g_0, ..., g_{N-1}) per
  parameter (or what ``adasum_state``'s reducer computes); every rank's optimizer then takes the
  same step.
* Delta mode (every optimizer a ``DistributedOptimizer``, ``LocalSGD`` included): DDP must leave
  each rank its own gradient, so the hook is PyTorch's ``noop_hook`` (no communication); each
  rank steps its own optimizer and the wrapper sets params = old + Adasum(d_0, ..., d_{N-1}) of
  the ranks' deltas d_r. This works under automatic optimization: Lightning hands
  ``optimizer.step`` a closure that runs the forward and backward passes, the wrapper calls it,
  and the backward pass, under the no-op hook, leaves the gradients local. Manual optimization
  works too, with or without ``block_backward_sync()``.

Checkpoints: in delta mode every rank's optimizer state (Adam's moments, say) is its own.
:meth:`~AdasumStrategy.optimizer_state` gathers all ranks' states into the one file rank 0
writes, ``{"adasum_per_rank": [state_0, ..., state_{N-1}]}`` per optimizer (tensors on the CPU),
and :meth:`~AdasumStrategy.load_optimizer_state_dict` gives each rank its own back. A checkpoint
written by another number of ranks N resumes too: rank r takes old rank ``r mod N``'s state
(:func:`adasum.optim.rank_state`, the rule of every elastic resume in this package), so each
rank continues one real rank's moments and step count. In gradient mode the ranks' states are
equal and checkpoints are Lightning's own.

Gradient accumulation (``Trainer(accumulate_grad_batches=k)``) works in both modes: Lightning
divides each batch's loss by k and calls ``optimizer.step`` after the k-th backward pass only, so
in delta mode each rank's local step sees the mean of its k gradients (leave the wrapper's
``backward_passes_per_step`` at 1; tested with k = 2).

Neither mode divides by the world size: keep the learning rate tuned for one rank's batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.nn.parallel import DistributedDataParallel

from adasum.ddp import AdasumState, is_delta_mode, use_adasum
from adasum.optim import rank_state

__all__ = ["AdasumStrategy"]

#: The key of the list of every rank's optimizer state in a delta-mode checkpoint.
PER_RANK = "adasum_per_rank"
# DDPStrategy's own hook options: Adasum's hook replaces them.
_HOOK_OPTIONS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class AdasumStrategy(DDPStrategy):
    """``DDPStrategy`` with Adasum across the ranks (module docstring).

    Args:
        adasum_state: the hook's state for gradient mode (default ``AdasumState()``: Adasum over
            the default group, closed at teardown; ``AdasumState(adasum.Hierarchical(...))`` for
            nodes, ``AdasumState(stats=True)`` for statistics, closed by you). Not allowed in
            delta mode, where the wrapper's reducer decides.
        **kwargs: those of ``DDPStrategy`` (``process_group_backend``, ``start_method``, DDP's
            own options), except its hook options.

    :attr:`adasum_state` is the state in use (None in delta mode or before ``setup``).
    """

    def __init__(self, adasum_state: AdasumState | None = None, **kwargs: Any) -> None:
        given = [k for k in _HOOK_OPTIONS if k in kwargs]
        if given:
            raise TypeError(f"AdasumStrategy registers Adasum's own DDP hook; it takes no {', '.join(given)}")
        super().__init__(**kwargs)
        self._given_state = adasum_state
        self.adasum_state: AdasumState | None = None

    @property
    def delta_mode(self) -> bool:
        """Whether the optimizers are DistributedOptimizers (all of them; a mix is refused)."""
        return is_delta_mode(self.optimizers)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)  # wraps the module in a new DDP when fitting, then makes the optimizers
        if trainer.state.fn == TrainerFn.FITTING and isinstance(self.model, DistributedDataParallel):
            self.adasum_state = use_adasum(self.model, self.optimizers, adasum_state=self._given_state)

    def teardown(self) -> None:
        super().teardown()
        if self.adasum_state is not None and self._given_state is None:
            self.adasum_state.close()  # ends the hook's thread and frees its process group
            self.adasum_state = None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Lightning's state of ``optimizer``; in delta mode, on rank 0, every rank's (gathered
        there, on the CPU) under ``"adasum_per_rank"``. Every rank must call it (Lightning's
        ``dump_checkpoint`` does)."""
        state = super().optimizer_state(optimizer)
        if not (self.delta_mode and dist.is_initialized()):
            return state
        gathered: list[Any] | None = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(apply_to_collection(state, torch.Tensor, torch.Tensor.cpu), gathered, dst=0)
        return {PER_RANK: gathered} if self.is_global_zero else {}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore the optimizers; from a delta-mode checkpoint, each rank its own state."""
        states = checkpoint["optimizer_states"]
        if any(PER_RANK in s for s in states):
            checkpoint = {**checkpoint, "optimizer_states": [self._own(s[PER_RANK]) for s in states]}
        super().load_optimizer_state_dict(checkpoint)

    def _own(self, per_rank: list[Any]) -> Any:
        if not self.delta_mode:
            raise ValueError("AdasumStrategy: this checkpoint holds per-rank optimizer states (delta mode); "
                             "gradient mode needs one state for all ranks")
        return rank_state(per_rank, self.global_rank)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        # Overridden so that DDPStrategy's names ("ddp", ...) keep pointing to DDPStrategy.
        strategy_registry.register("adasum", cls, description="DDP with Adasum instead of averaging",
                                   start_method="popen")
        strategy_registry.register("adasum_spawn", cls, description="DDP with Adasum, worker processes spawned",
                                   start_method="spawn")


AdasumStrategy.register_strategies(StrategyRegistry)
