r"""Local SGD and DiLoCo: several local optimizer steps between reductions, and an optional
outer optimizer over the reduced update.

With :math:`x_s` the parameters after synchronisation s (identical on every rank), every rank r
runs H steps of its own optimizer (its own state, its own data) from :math:`x_s`, reaching
:math:`y_r`. The deltas are reduced per layer by the reducer R (:class:`adasum.Adasum`,
:class:`adasum.Average`, any :class:`adasum.Reducer`):

.. math::

    \delta_r = y_r - x_s, \qquad D = R(\delta_0, \ldots, \delta_{N-1}), \qquad
    x_{s+1} = \begin{cases} x_s + D & \text{(local SGD)} \\
                            \mathrm{outer}(x_s, g = -D) & \text{(DiLoCo)} \end{cases}

The outer optimizer steps on the pseudo-gradient :math:`-D` from :math:`x_s`; it sees the same
input on every rank, so its state stays identical everywhere. DiLoCo (Douillard et al., 2023)
is AdamW inside and SGD with Nesterov momentum outside, with R the average. With R = Adasum the
combination moves, per layer, between averaging the deltas (parallel deltas) and summing them
(orthogonal deltas): an outer learning rate between 1 and N chosen by the geometry of the
deltas. H = 1 without an outer optimizer is delta mode (:class:`DistributedOptimizer`).

The deltas may travel in a narrower dtype (``wire_dtype=torch.bfloat16``): each rank rounds its
delta to it, the reduction accumulates its dot products and norms in float64 as always and
writes D in that dtype, and D is widened back before it is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from adasum._reducer import Agreement, Reducer
from adasum._stats import Stats
from adasum.optim._delta import take_delta
from adasum.optim._distributed import DistributedOptimizer

__all__ = ["LocalSGD"]


class LocalSGD(DistributedOptimizer):
    """Wrap ``optimizer`` (the inner optimizer) so that the ranks synchronise every
    ``sync_every`` updates: the deltas from the last synchronised parameters are reduced, and
    the parameters move by the result, or by ``outer``'s step on its negation (see the module
    docstring). The loop is the usual one::

        broadcast_parameters(model)
        opt = LocalSGD(
            torch.optim.AdamW(model.parameters(), lr=4e-4),
            sync_every=100,
            outer=torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True),
        )
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()  # a local step; every 100th also synchronises

    Args:
        optimizer: the inner optimizer; its state stays local to this rank.
        reducer: what to reduce the deltas with (default :class:`adasum.Adasum` over the
            default group).
        sync_every: H, the updates of the inner optimizer between synchronisations.
        outer: an optimizer over exactly the inner optimizer's parameters, stepped on the
            pseudo-gradient at each synchronisation; None adds the reduced delta as it is.
        backward_passes_per_step: backward passes accumulated per inner update, counted as in
            :class:`DistributedOptimizer`.
        stats: record what the reduction saw, per layer, at each synchronisation in
            :attr:`last_stats` (statistics of the deltas; their noise scale is that of the
            deltas, not of gradients).
        named_parameters: ``model.named_parameters()`` to name the layers in the statistics.
        wire_dtype: the dtype the deltas are reduced in (float16, bfloat16, float32, float64);
            None: the parameters' own.

    The first update after a synchronisation (or after :meth:`load_state_dict`) checks with the
    other ranks that all pass the same parameters, ``sync_every``, the outer optimizer's kind
    and hyperparameters and the other options, before anything changes: on a mismatch every
    rank raises the same error. The steps in between send nothing. A ``GradScaler`` (float16)
    is this rank's own: see :meth:`step`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        reducer: Reducer | None = None,
        *,
        sync_every: int,
        outer: torch.optim.Optimizer | None = None,
        backward_passes_per_step: int = 1,
        stats: bool = False,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        plain = isinstance(outer, torch.optim.Optimizer) and not isinstance(outer, DistributedOptimizer)
        if outer is not None and not plain:
            raise TypeError(f"outer must be a plain torch.optim.Optimizer, got {type(outer).__name__}")
        if outer is optimizer:
            raise ValueError("outer must be an optimizer of its own, not the inner optimizer")
        if wire_dtype not in (None, torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"wire_dtype must be None or a floating dtype the reducers take, got {wire_dtype}")
        super().__init__(optimizer, reducer, backward_passes_per_step, stats=stats, named_parameters=named_parameters)
        self.sync_every = sync_every
        self.outer = outer
        self.wire_dtype = wire_dtype
        self._wire: list[torch.Tensor] = []  # the deltas in wire_dtype, kept between cycles
        self._inner_steps = 0  # updates since the last synchronisation
        self._agreement: Agreement | None = None  # the ranks' agreement for the current cycle

    def __repr__(self) -> str:
        return f"LocalSGD({self.optimizer!r}, sync_every={self.sync_every}, outer={self.outer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (and, by hand, to the outer one) between cycles:
        in the middle of one the new parameters would have no synchronised values."""
        if self._inner_steps:
            raise RuntimeError(f"add_param_group {self._inner_steps} updates into a cycle; add parameter "
                               "groups when inner_steps is 0 (right after a synchronisation)")
        super().add_param_group(param_group)

    @property
    def inner_steps(self) -> int:
        """Updates of the inner optimizer since the last synchronisation (0 to H-1)."""
        return self._inner_steps

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Accumulate, or update the inner optimizer; on the H-th update, synchronise. Returns
        the closure's value (None without one, or when an overflow skipped the update).

        Under ``GradScaler.step`` every rank's scaler is its own (it scales only this rank's
        gradients): an overflow skips this rank's inner update, which still counts, so that the
        ranks synchronise together; gradients the user did not unscale are unscaled here.
        """
        found_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        accumulating, value = self._between_updates(closure, found_inf)
        if accumulating:
            return value
        params = self._params()
        if self._agreement is None:
            # Before the first update of a cycle nothing has changed yet: the one round of
            # the cycle, so that a mismatch raises everywhere instead of hanging the sync.
            self._agreement = self._check(params, found_inf)
            if self._inner_steps == 0:
                self._snapshot(params)
        elif (error := self._early_scaler_step(found_inf)) is not None:
            raise error
        loss = self._inner_update(closure, found_inf, grad_scale)
        self._end_cycle()
        if self._inner_steps + 1 < self.sync_every:
            self._inner_steps += 1
            return loss
        take_delta(params, self._start)
        agreement, self._agreement, self._inner_steps = self._agreement, None, 0
        self._reduce(params, self._start, None, agreement)
        return loss

    def _inner_update(
        self, closure: Callable[[], Any] | None, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None
    ) -> Any:
        if found_inf is not None:
            if found_inf.item() > 0:
                return None  # skipped, as GradScaler skips it on one device; update() backs off
            if grad_scale is not None:
                self._unscale(grad_scale)
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def _options(self, found_inf: torch.Tensor | None) -> dict[str, object]:
        options = super()._options(found_inf)
        # inner_steps is 0 except after a resume: a rank that loaded another step's checkpoint.
        options.update(sync_every=self.sync_every, inner_steps=self._inner_steps)
        options.update(_described(self.outer))
        return options

    def _local_error(self, params: list[torch.Tensor], found_inf: torch.Tensor | None) -> Exception | None:
        # No grad_scaler= is needed: the scalers need not agree (see step).
        error = self._early_scaler_step(found_inf)
        if error is None and self.outer is not None:
            inner = {id(p) for p in params}
            outer = {id(p) for group in self.outer.param_groups for p in group["params"]}
            if inner != outer:
                error = ValueError(f"the outer optimizer holds {len(outer - inner)} parameters the inner one does "
                                   f"not and misses {len(inner - outer)} of its; give it the same parameters")
        return error

    def _sent(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.wire_dtype is None:
            return params
        if [(w.shape, w.device) for w in self._wire] != [(p.shape, p.device) for p in params]:
            self._wire = [torch.empty_like(p, dtype=self.wire_dtype) for p in params]
        return self._wire

    def _all_reduce(self, params: list[torch.Tensor], agreement: Agreement) -> Stats | None:
        if self.wire_dtype is None:
            return super()._all_reduce(params, agreement)
        wire = self._sent(params)
        with torch.no_grad():
            torch._foreach_copy_(wire, [p.detach() for p in params])
            stats = self.reducer.all_reduce(wire, stats=self.stats, agreement=agreement)
            torch._foreach_copy_([p.detach() for p in params], wire)
        return stats

    def _apply(self, params: list[torch.Tensor], start: list[torch.Tensor]) -> None:
        """``params`` hold the reduced delta D: without an outer optimizer they become
        start + D; with one, they become start and the outer optimizer steps on -D."""
        if self.outer is None:
            super()._apply(params, start)
            return
        with torch.no_grad():
            pseudo = torch._foreach_neg([p.detach() for p in params])
            torch._foreach_copy_([p.detach() for p in params], start)
        # The inner gradients are put back afterwards: the user's loop owns them.
        kept = [p.grad for p in params]
        try:
            for p, g in zip(params, pseudo):
                p.grad = g
            self.outer.step()
        finally:
            for p, grad in zip(params, kept):
                p.grad = grad

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's inner state, the outer state (the same on every rank), the updates since
        the last synchronisation and, in the middle of a cycle, the synchronised parameters
        the deltas are taken from (copies)."""
        return {
            "inner": self.optimizer.state_dict(),
            "outer": None if self.outer is None else self.outer.state_dict(),
            "inner_steps": self._inner_steps,
            "start": [t.clone() for t in self._start] if self._inner_steps else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (after restoring the parameters): the run
        continues as if uninterrupted. Everything is checked before anything is loaded."""
        steps, start = int(state_dict["inner_steps"]), state_dict["start"]
        if (state_dict["outer"] is None) != (self.outer is None):
            raise ValueError("the checkpoint and this LocalSGD differ in having an outer optimizer")
        if not 0 <= steps < self.sync_every:
            raise ValueError(f"the checkpoint is {steps} updates into a cycle; sync_every is {self.sync_every}")
        params = self._params()
        if steps and [tuple(t.shape) for t in start] != [tuple(p.shape) for p in params]:
            raise ValueError("the checkpoint's synchronised parameters do not match this optimizer's parameters")
        self.optimizer.load_state_dict(state_dict["inner"])
        if self.outer is not None:
            self.outer.load_state_dict(state_dict["outer"])
        self._inner_steps, self._agreement = steps, None
        if steps:
            self._snapshot(params)
            with torch.no_grad():
                for mine, saved in zip(self._start, start):
                    mine.copy_(saved)


def _described(outer: torch.optim.Optimizer | None) -> dict[str, object]:
    """The outer optimizer as options every rank must share: its kind and every parameter
    group's hyperparameters (which a scheduler may change, so they are compared each cycle)."""
    if outer is None:
        return {"outer": None}
    described: dict[str, object] = {"outer": f"{type(outer).__name__} with {len(outer.param_groups)} groups"}
    for i, group in enumerate(outer.param_groups):
        for key, value in group.items():
            if key != "params":
                described[f"outer[{i}].{key}"] = value.tolist() if isinstance(value, torch.Tensor) else value
    return described
