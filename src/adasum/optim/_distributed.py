r"""Delta mode: every rank steps its own optimizer, and the parameter updates are combined.

This is how the paper applies Adasum to Adam and LAMB. With x the parameters (identical on all
ranks), g_r rank r's gradient and opt_r rank r's optimizer (its own moments):

.. math::

    \delta_r = \mathrm{opt}_r(x, g_r) - x, \qquad
    x \leftarrow x + \mathrm{Adasum}(\delta_0, \ldots, \delta_{N-1})

with Adasum per parameter tensor in the order of :func:`adasum.schedule` (or any other
:class:`adasum.Reducer`: the averaging and summing baselines take the same path). By default the
wrapped optimizer steps once over all its parameters (so optimizers that look across
parameters, like a global clip inside the optimizer, see everything) after the backward pass,
and the deltas of all parameters travel in one reducer call. With ``overlap=True`` optimizers
that update each parameter on its own step bucket by bucket as the gradients arrive, and the
buckets' deltas are reduced while backward continues (:mod:`adasum.optim._overlap`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from adasum._adasum import Adasum
from adasum._baselines import Average
from adasum._broadcast import broadcast
from adasum._noise import Moments
from adasum._reducer import Agreement, Reducer
from adasum._stats import Stats
from adasum._torch import scaler_found_inf_per_device
from adasum.optim._delta import apply_delta, local_delta
from adasum.optim._elastic import gather_states, rank_state
from adasum.optim._overlap import Overlap, overlap_problem
from adasum.optim._wrapper import Wrapper

__all__ = ["DistributedOptimizer", "broadcast_parameters"]


class DistributedOptimizer(Wrapper):
    """Wrap ``optimizer`` so that each :meth:`step` reduces the ranks' parameter deltas with
    Adasum or another reducer (delta mode, see the module docstring).

    Use it on a model whose gradients are NOT averaged by DDP (a plain module, or DDP with every
    backward inside ``no_sync()``), after making the parameters equal on all ranks with
    :func:`broadcast_parameters`. The loop is the usual one::

        opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    Args:
        optimizer: any ``torch.optim.Optimizer``; its state (moments) stays local to this rank.
        reducer: what to reduce the deltas with (default :class:`adasum.Adasum` over the
            default group); its group is the ranks that train together.
        backward_passes_per_step: gradients of this many backward passes are accumulated before
            an update. The passes are counted (hooks on the parameters), so :meth:`step` and
            :meth:`zero_grad` may be called after every pass: they do nothing until the last
            pass of the cycle. :attr:`ready` tells whether the next step updates.
        grad_scaler: the ``torch.amp.GradScaler`` used with this optimizer, if any. Needed so
            that an overflow on one rank makes every rank skip the step and every rank's scaler
            back off (see :meth:`step`).
        stats: record what each combination of the deltas saw, per layer, in
            :attr:`last_stats` (:class:`adasum.Stats`); never changes the result. Its
            :meth:`~adasum.Stats.noise_scale` is that of the gradients before the local step:
            they are averaged, on a copy, over the group, which costs one more all-reduce of the
            gradients' size on every step with ``stats``.
        named_parameters: ``model.named_parameters()`` to name the layers in the statistics.
        overlap: step and reduce while backward runs, as the DDP hook does: when the gradients
            of a bucket of parameters (about ``bucket_cap_mb`` megabytes, in reverse order) are
            final, the wrapped optimizer steps those parameters alone and a background thread
            reduces their deltas; :meth:`step` finishes the buckets left and waits. The result
            is the whole-model step's (see :mod:`adasum.optim._overlap` for when it is
            bit-identical). Only for SGD, Adam, AdamW and :class:`~adasum.optim.Lamb` (whose
            steps are per parameter) on CPU, without ``stats``; with ``grad_scaler`` the steps
            stay whole-model ones, since an overflow on any rank must skip the step before
            anything changes. Call :meth:`step` after every update's last backward pass (until
            then parameters may hold their local step's values), and :meth:`close` to end the
            thread.
        bucket_cap_mb: the most megabytes of parameters in one bucket with ``overlap``.

    Before the local step every rank checks, together with the others, that all pass the same
    parameters (as :meth:`adasum.Reducer.check` does) and the same options that change what a
    step sends (``stats``, ``backward_passes_per_step``, ``grad_scaler``, and whether
    ``GradScaler.step`` drives this step): on a mismatch, or an error one rank sees, every rank
    raises the same error and no optimizer state has changed.
    """

    # GradScaler.step then calls step() on every rank, handing over found_inf and grad_scale,
    # instead of deciding on this rank alone whether to call it: the ranks must agree first.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        reducer: Reducer | None = None,
        backward_passes_per_step: int = 1,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        stats: bool = False,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        overlap: bool = False,
        bucket_cap_mb: float = 25.0,
    ) -> None:
        # torch.optim.Optimizer.__init__ is not called: the wrapped optimizer owns the parameter
        # groups and the state, which this class exposes through properties.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("the optimizer is already a DistributedOptimizer")
        if int(backward_passes_per_step) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if reducer is not None and not isinstance(reducer, Reducer):
            raise TypeError(f"reducer must be an adasum.Reducer, got {type(reducer).__name__}")
        if overlap and (problem := overlap_problem(optimizer, stats, bucket_cap_mb)) is not None:
            raise ValueError(problem)
        self.optimizer = optimizer
        self.reducer = reducer if reducer is not None else Adasum()
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.grad_scaler = grad_scaler
        self.stats = stats
        self.last_stats: Stats | None = None
        self._names = {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        self._passes: dict[int, int] = {}
        self._hooked: set[int] = set()
        self._start: list[torch.Tensor] = []
        self._start_for: list[torch.Tensor] = []
        self._overlap: Overlap | None = None
        if overlap and grad_scaler is None:
            self._overlap = Overlap(
                optimizer, self.reducer, int(bucket_cap_mb * 2**20), self._final,
                lambda: self._check(self._params(), None),
            )
        for group in optimizer.param_groups:
            self._watch(group["params"])

    # -- the wrapped optimizer's face -------------------------------------------------------

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        if self._overlap is not None and (problem := overlap_problem(self.optimizer)) is not None:
            self.optimizer.param_groups.pop()  # a group overlap cannot step (a CUDA one) is refused
            raise ValueError(problem)
        self._watch(self.optimizer.param_groups[-1]["params"])

    def close(self) -> None:
        """End the background thread of ``overlap=True`` and free its group (a later update
        starts it again); nothing to do otherwise."""
        if self._overlap is not None:
            self._overlap.close()

    def _watch(self, params: Iterable[torch.Tensor]) -> None:
        params = list(params)
        self._count_passes_of(params)
        if self._overlap is not None:  # after the counting hooks: they run in this order
            self._overlap.hook(params)

    # -- accumulation -----------------------------------------------------------------------

    def _count_passes_of(self, params: Iterable[torch.Tensor]) -> None:
        if self.backward_passes_per_step == 1:
            return  # nothing to count: every step() updates
        for p in params:
            if p.requires_grad and id(p) not in self._hooked:
                self._hooked.add(id(p))
                self._passes[id(p)] = 0
                p.register_post_accumulate_grad_hook(self._count_pass)

    def _count_pass(self, param: torch.Tensor) -> None:
        self._passes[id(param)] += 1

    def _final(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s gradient is final: its pass completes an update."""
        return self.backward_passes_per_step == 1 or self._passes[id(param)] >= self.backward_passes_per_step

    @property
    def passes(self) -> int:
        """Backward passes accumulated since the last update (the most any parameter saw, so
        parameters unused in some passes do not hold the count back)."""
        return max(self._passes.values(), default=0)

    @property
    def ready(self) -> bool:
        """True when the next :meth:`step` updates the parameters (always without accumulation,
        so gradients computed before the wrapper existed count too)."""
        return self.backward_passes_per_step == 1 or self.passes >= self.backward_passes_per_step

    def _end_cycle(self) -> None:
        for key in self._passes:
            self._passes[key] = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, except in the middle of an accumulation cycle (then it does
        nothing, so that a loop calling it every pass accumulates)."""
        if self.passes == 0 or self.ready:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Accumulate, or update: check, local step, reduction of the deltas, parameters =
        start + result.

        With a closure, the closure is one backward pass: before the last pass of a cycle it is
        only evaluated; on the last it goes to the wrapped optimizer's step. Returns the
        closure's value (None without one, or when a step is skipped).

        Under ``GradScaler.step`` (which sets ``found_inf`` and ``grad_scale`` on this object
        first), the ranks take the maximum of their overflow flags: if any rank overflowed,
        every rank skips the update and its scaler records the overflow, so ``scaler.update()``
        backs off identically everywhere. Gradients the user did not unscale are unscaled here.
        """
        found_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        accumulating, value = self._between_updates(closure, found_inf)
        if accumulating:
            return value
        if self._overlap is not None:
            return self._overlapped_step(closure, found_inf)
        params = self._params()
        agreement = self._check(params, found_inf)  # before anything changes
        if found_inf is not None:
            if self._overflow_anywhere(found_inf):
                self._end_cycle()
                return None
            if grad_scale is not None:
                self._unscale(grad_scale)
        moments = self._gradient_moments(params) if self.stats else None
        start = self._snapshot(params)
        loss = local_delta(self.optimizer, params, start, closure)
        self._reduce(params, start, moments, agreement)
        self._end_cycle()
        return loss

    def _between_updates(self, closure: Callable[[], Any] | None, found_inf: torch.Tensor | None) -> tuple[bool, Any]:
        """``(True, what step returns)`` when this call of :meth:`step` only accumulates a
        backward pass (evaluating the closure, if any); ``(False, None)`` when it updates."""
        if closure is not None and self.passes + 1 < self.backward_passes_per_step:
            with torch.enable_grad():
                return True, closure()
        return closure is None and not self.ready and found_inf is None, None

    def _overlapped_step(self, closure: Callable[[], Any] | None, found_inf: torch.Tensor | None) -> Any:
        """The end of an overlapped update: the closure's backward pass (if any) steps buckets
        through the hooks; then the buckets left are stepped and every reduction awaited."""
        assert self._overlap is not None
        unknown_scaler = RuntimeError(
            "DistributedOptimizer(overlap=True) is stepped by a GradScaler it does not know, which cannot stop "
            "the buckets stepped during backward; pass grad_scaler=scaler (then it takes whole-model steps)"
        )
        if found_inf is not None and not self.ready:
            raise unknown_scaler  # before the last pass: no bucket has been stepped
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._overlap.finish()
        self._end_cycle()
        if found_inf is not None:
            raise unknown_scaler  # after the update, which went ahead
        return loss

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _gradient_moments(self, params: list[torch.Tensor]) -> Moments | None:
        """The noise scale's moments of this step's gradients (the deltas the reduction sees are
        not gradients): every rank's squared norms and their average's. A missing gradient
        counts as zero, as it does in the local step."""
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        average = Average(self.reducer.group)
        # The check before the local step agreed on the parameters, whose shapes the gradients
        # share, and on stats=True: that agreement covers this reduction too.
        stats = average.all_reduce(grads, stats=True, agreement=average.agreement(grads, stats=True))
        assert stats is not None, "all_reduce returns the statistics with stats=True"
        return stats.moments

    def _check(self, params: list[torch.Tensor], found_inf: torch.Tensor | None) -> Agreement:
        """:meth:`adasum.Reducer.check` of the parameters, in the same round as the options that
        change what a step sends: a rank that all-reduces an overflow flag, or steps at another
        pass, while the others reduce would leave them waiting."""
        return self.reducer.check(
            self._sent(params), stats=self.stats, options=self._options(found_inf),
            error=self._local_error(params, found_inf),
        )

    def _sent(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the reduction sends, whose layout the ranks agree on: the parameters
        themselves, holding their deltas."""
        return params

    def _options(self, found_inf: torch.Tensor | None) -> dict[str, object]:
        """The settings every rank must step with alike."""
        return {
            "backward_passes_per_step": self.backward_passes_per_step,
            "grad_scaler": self.grad_scaler is not None,
            "stepped_by_grad_scaler": found_inf is not None,
            "overlap": self._overlap is not None,
        }

    def _local_error(self, params: list[torch.Tensor], found_inf: torch.Tensor | None) -> Exception | None:
        """A problem this rank sees in its own use of the wrapper; every rank raises it."""
        if found_inf is not None and self.grad_scaler is None:
            return RuntimeError(
                "DistributedOptimizer is stepped by a GradScaler it does not know: pass "
                "grad_scaler=scaler to DistributedOptimizer, so that an overflow on one rank "
                "makes every rank's scaler back off and the scalers stay identical",
            )
        return self._early_scaler_step(found_inf)

    def _early_scaler_step(self, found_inf: torch.Tensor | None) -> Exception | None:
        """The error of a step through ``GradScaler.step`` before the last backward pass of an
        accumulation cycle (which would update too early), else None."""
        if found_inf is None or self.ready:
            return None
        return RuntimeError(
            f"GradScaler.step was called after {self.passes} of {self.backward_passes_per_step} "
            "backward passes; with accumulation, call scaler.unscale_/step/update only when "
            f"{type(self).__name__}.ready is True",
        )

    def _snapshot(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        # The copies of the parameters are kept between steps: allocating 1x the model every
        # step costs more than the copy itself.
        if len(params) != len(self._start_for) or any(a is not b for a, b in zip(params, self._start_for)):
            self._start = [torch.empty_like(p) for p in params]
            self._start_for = list(params)
        with torch.no_grad():
            torch._foreach_copy_(self._start, [p.detach() for p in params])
        return self._start

    def _reduce(
        self, params: list[torch.Tensor], start: list[torch.Tensor], moments: Moments | None, agreement: Agreement
    ) -> None:
        # The parameters hold their deltas: they are reduced in place and shifted back, so delta
        # mode needs no memory beyond the snapshot.
        try:
            # Checked before the local step: no second agreement round.
            stats = self._all_reduce(params, agreement)
        except BaseException:
            # Leave usable parameters behind (the values before this step), not deltas.
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in params], start)
            raise
        self._apply(params, start)
        if stats is not None:
            names = tuple(self._names.get(id(p), str(i)) for i, p in enumerate(params))
            self.last_stats = Stats(stats.stages, names, moments)

    def _all_reduce(self, params: list[torch.Tensor], agreement: Agreement) -> Stats | None:
        """Reduce the deltas the parameters hold, in place."""
        return self.reducer.all_reduce(params, stats=self.stats, agreement=agreement)

    def _apply(self, params: list[torch.Tensor], start: list[torch.Tensor]) -> None:
        """``params`` (holding the reduced delta) become start + delta."""
        apply_delta(params, start)

    # -- checkpoints across a change of world size -----------------------------------------

    def gather_state_dicts(self, dst: int = 0) -> list[dict[str, Any]] | None:
        """Every rank's :meth:`state_dict` (its own moments), in the order of the reducer's
        group, on group rank ``dst``; None on the others. Every rank of the group calls it.
        Save the list in the checkpoint and resume with :meth:`load_state_dicts`."""
        return gather_states(self.state_dict(), self.reducer.group, dst)

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Load this rank's state from every old rank's (:meth:`gather_state_dicts`), on any
        number of ranks: rank r of the group takes old rank ``r mod len(states)``'s
        (:func:`adasum.optim.rank_state`; the same number of ranks gets its own back)."""
        self.load_state_dict(rank_state(states, dist.get_rank(self.reducer.group)))

    def _overflow_anywhere(self, found_inf: torch.Tensor) -> bool:
        flag = found_inf.detach().float().reshape(1).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.reducer.group)
        # GradScaler.update() reads the per-device flags it recorded for this optimizer, not the
        # summed copy handed to step(); they must hold the agreed value or the scalers diverge.
        # GradScaler offers no public way to set them.
        assert self.grad_scaler is not None, "_check raised on every rank for a scaler it does not know"
        per_device = scaler_found_inf_per_device(self.grad_scaler, self)
        for t in per_device.values():
            t.copy_(flag.to(t.device).reshape(t.shape))
        return bool(flag.item() > 0)

    @torch.no_grad()
    def _unscale(self, grad_scale: torch.Tensor) -> None:
        # The same arithmetic as GradScaler.unscale_: multiply by the float32 reciprocal.
        inv = grad_scale.double().reciprocal().float()
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, _), grads in by_kind.items():
            ignored = torch.zeros(1, device=device)  # the overflow is already known
            torch._amp_foreach_non_finite_check_and_unscale_(grads, ignored, inv.to(device))


@torch.no_grad()
def broadcast_parameters(
    params: torch.nn.Module | Iterable[torch.Tensor],
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Make every rank's parameters (and, for a module, buffers) equal to those of rank ``src``
    of ``group``. Delta mode needs equal starting points; DDP does this in its constructor.

    The ranks first agree on ``src`` and on the tensors' number, shapes and dtypes
    (:func:`adasum._broadcast.broadcast`; a broadcast into a tensor of another size copies part
    of it without a word): on a difference every rank raises the same error and nothing is
    copied."""
    tensors = (
        list(params.parameters()) + list(params.buffers())
        if isinstance(params, torch.nn.Module)
        else list(params)
    )
    broadcast([t.detach() for t in tensors], src, group)
