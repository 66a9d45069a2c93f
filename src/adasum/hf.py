"""Adasum in the Hugging Face ``Trainer``: a subclass that puts :mod:`adasum.ddp`'s hook on the
model the Trainer wrapped.

::

    from adasum.hf import AdasumTrainer
    trainer = AdasumTrainer(model=model, args=args, train_dataset=data)          # gradient mode
    trainer = AdasumTrainer(model=model, args=args, train_dataset=data,          # delta mode
                            optimizers=(DistributedOptimizer(torch.optim.AdamW(model.parameters())), None))

launched with ``torchrun`` (``pip install -e '.[hf]'``). The Trainer builds its
DistributedDataParallel itself, through Accelerate, whose DDP options know only PyTorch's
built-in hooks, and hands callbacks the unwrapped model; :meth:`Trainer.training_step` is the
first public place that receives the wrapped one, so the hook is registered there, once, before
the first backward pass.

* Gradient mode (any other optimizer): each synchronising backward pass replaces DDP's average
  of the ranks' gradients g_r by Adasum(g_0, ..., g_{N-1}) per parameter (or what the given
  :class:`~adasum.ddp.AdasumState`'s reducer computes); the optimizer then steps on that, the
  same on every rank.
* Delta mode (``optimizers=`` holds an :class:`adasum.optim.DistributedOptimizer`): DDP must
  leave each rank its own gradient, so the hook registered is PyTorch's ``noop_hook`` (no
  communication); each rank steps its own optimizer and the parameter deltas d_r are combined,
  params = old + Adasum(d_0, ..., d_{N-1}), by the wrapper.

Neither divides by the world size: keep the learning rate tuned for one rank's batch. Adasum's
operands are the ranks' own gradients, each of its own loss, so the trainer turns off
``TrainingArguments.average_tokens_across_devices`` (on by default): that option divides each
rank's summed loss by the token count of all ranks and multiplies it by N to undo DDP's
division, which Adasum does not do (a model that takes ``**kwargs`` but averages its loss itself,
such as BERT's sequence classifier, would then hand Adasum N times its gradient). Without it,
each rank's loss is the mean over its own batch. With ``gradient_accumulation_steps=k`` the
Trainer skips DDP's synchronisation on the first k-1 passes, so the hook reduces the accumulated
gradient once per step; in delta mode give the wrapper ``backward_passes_per_step=k`` as well.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from adasum.ddp import AdasumState, is_delta_mode, use_adasum

__all__ = ["AdasumTrainer"]


class AdasumTrainer(Trainer):
    """``transformers.Trainer`` with Adasum across the data-parallel ranks (module docstring).

    Args:
        adasum_state: the hook's state for gradient mode (default ``AdasumState()``: Adasum over
            the default group; ``AdasumState(adasum.Hierarchical())`` for nodes,
            ``AdasumState(stats=True)`` for statistics). Not allowed in delta mode, where the
            wrapper's reducer decides.
        *args, **kwargs: those of ``Trainer``.

    :attr:`adasum_state` is the state in use (None in delta mode or before the first step);
    close it (``trainer.adasum_state.close()``) when training is over to end its thread.
    """

    def __init__(self, *args: Any, adasum_state: AdasumState | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.args.average_tokens_across_devices = False  # each rank's own mean loss (module docstring)
        self._given_state = adasum_state
        self.adasum_state: AdasumState | None = None
        self._hooked: DistributedDataParallel | None = None

    @property
    def delta_mode(self) -> bool:
        """Whether the optimizer is a DistributedOptimizer (Accelerate wraps it; look inside)."""
        return self.optimizer is not None and is_delta_mode([self.optimizer])

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        # A model the Trainer did not wrap (one process) has nothing to reduce in gradient mode.
        if isinstance(model, DistributedDataParallel) and model is not self._hooked:
            self._attach(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def _attach(self, ddp: DistributedDataParallel) -> None:
        assert self.optimizer is not None, "the Trainer creates the optimizer before the first training step"
        self.adasum_state = use_adasum(ddp, self.optimizer, adasum_state=self._given_state)
        self._hooked = ddp
