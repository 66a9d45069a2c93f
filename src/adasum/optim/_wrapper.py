"""The face of an optimizer that wraps another: the wrapped optimizer owns the parameter groups,
the state and the defaults, and the wrapper shows them as its own, so that schedulers, GradScaler
and checkpoints that look at ``param_groups`` or ``state`` see the real ones."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Wrapper"]


class Wrapper(torch.optim.Optimizer):
    """Base of optimizers that step ``self.optimizer``. ``torch.optim.Optimizer.__init__`` is not
    called: there is no state of the wrapper's own to set up. ``state_dict`` is the wrapped
    optimizer's, this rank's own."""

    optimizer: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
