r"""A Keras 3 optimizer that combines the workers' updates with Adasum, for ``model.fit`` across
processes.

Two modes, as in the paper and in :mod:`adasum.optim` / :mod:`adasum.ddp`:

* ``"delta"``: every worker's inner optimizer steps on its own gradients, and the weight
  changes are combined (the way the paper applies Adasum to Adam and LAMB):

  .. math::  x \leftarrow x + \mathrm{Adasum}(\mathrm{opt}_0(x, g_0) - x, \ldots,
             \mathrm{opt}_{N-1}(x, g_{N-1}) - x)

  The inner optimizer's state (moments) stays per worker.
* ``"gradient"``: the gradients are combined, then every worker's inner optimizer (identical
  everywhere) steps on the result: :math:`x \leftarrow \mathrm{opt}(x, \mathrm{Adasum}(g_0,
  \ldots, g_{N-1}))`, for SGD and momentum.

With ``gradient_accumulation_steps=k`` the gradients of k batches are averaged on each worker
(Keras's own meaning of that option) before one update, so the workers communicate once per k
batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from adasum._adasum import Adasum
from adasum._reducer import Reducer
from adasum.keras import _backend

__all__ = ["DistributedOptimizer", "MODES"]

MODES = ("delta", "gradient")


class DistributedOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer so that each update combines the workers' updates (module
    docstring). Use it in ``model.compile`` on every worker, after making the weights equal
    with :func:`adasum.keras.broadcast_variables`::

        model.compile(optimizer=DistributedOptimizer(keras.optimizers.Adam(1e-3)), loss=...)
        broadcast_variables(model.variables)
        model.fit(x_shard, y_shard, ...)

    Args:
        optimizer: the inner ``keras.optimizers.Optimizer``; its learning rate, schedule,
            clipping and weight decay apply as usual.
        reducer: what to combine with (default :class:`adasum.Adasum` over the default
            torch.distributed group; :class:`adasum.Average` and :class:`adasum.Sum` give the
            baselines).
        mode: ``"delta"`` (default) or ``"gradient"``.
        gradient_accumulation_steps: batches per update (averaged gradients).

    At its first update it also gives every worker rank 0's trainable variables (once the
    workers have agreed on the update, before any state changes), so that a model that was not
    built yet when ``broadcast_variables`` ran (a ``Sequential`` without ``keras.Input``, whose
    broadcast is refused) still trains the same weights on every worker; that first update's
    gradients were computed at each worker's own start, which broadcasting a built model before
    ``fit`` avoids.

    The trainable variables stay bit-identical on every worker. If the workers' variables or
    reducers differ, every worker raises the same error before any weight or optimizer variable
    changes, also in Keras's compiled train step; so do they if the workers' ``mode`` or
    ``gradient_accumulation_steps`` differ (compared at the first update). Non-trainable variables
    (normalization statistics) are each worker's own; broadcast them before saving if they
    must agree. Keras's ``mixed_float16`` policy is not supported: its loss scaler would skip
    steps on one worker alone. Keras's compiled train step must not be XLA-compiled on the
    TensorFlow backend (``jit_compile=False``, the default on CPU).
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        reducer: Reducer | None = None,
        *,
        mode: str = "delta",
        gradient_accumulation_steps: int = 1,
        name: str | None = None,
    ) -> None:
        _backend.check_backend()
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"expected a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("the optimizer is already a DistributedOptimizer")
        if optimizer.gradient_accumulation_steps:
            raise ValueError(
                "set gradient_accumulation_steps on DistributedOptimizer, not on the inner "
                "optimizer: the workers must communicate once per accumulated update"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if reducer is not None and not isinstance(reducer, Reducer):
            raise TypeError(f"reducer must be an adasum.Reducer, got {type(reducer).__name__}")
        if keras.config.dtype_policy().name == "mixed_float16":
            raise ValueError(
                "adasum.keras does not support the mixed_float16 policy: Keras's loss scaler "
                "would skip a step on one worker while the others communicate"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.reducer = reducer if reducer is not None else Adasum()
        self.mode = mode
        self.accumulation_steps = int(gradient_accumulation_steps)

    # -- state --------------------------------------------------------------------------------

    def build(self, variables: Sequence[keras.Variable]) -> None:
        self.inner_optimizer.build(variables)
        # 1 once the first update has given every worker rank 0's trainable variables. A
        # variable, not a Python flag: the compiled train step is traced once and must decide
        # at run time; and saved with the optimizer, so a resumed run does not broadcast again.
        self._started_equal = self.add_variable((), initializer="zeros", dtype="int32", name="started_equal")
        if self.accumulation_steps > 1:
            self._pass = self.add_variable((), initializer="zeros", dtype="int32", name="pass")
            self._sums = self.add_optimizer_variables(variables, "accumulated_gradient")
        super().build(variables)

    @property
    def variables(self) -> list[keras.Variable]:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        self.inner_optimizer.learning_rate = value

    @property
    def iterations(self) -> keras.Variable:
        """Updates made (the inner optimizer's count, which drives its schedule)."""
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, variables: Sequence[keras.Variable]) -> None:
        self.inner_optimizer.finalize_variable_values(variables)

    def get_config(self) -> dict[str, Any]:
        # The reducer is not saved: a loaded optimizer combines with Adasum.
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "mode": self.mode,
            "gradient_accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> DistributedOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)

    # -- the update ---------------------------------------------------------------------------

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[keras.Variable] | None = None) -> None:
        """Accumulate, or update (:meth:`update`) every ``gradient_accumulation_steps`` calls."""
        if not self.built:  # type: ignore[has-type]  # Keras sets it untyped, in a cycle mypy cannot order
            if trainable_variables is None:
                raise ValueError("DistributedOptimizer.apply: the first call needs trainable_variables, to build")
            self.build(trainable_variables)
            self.built = True
        variables = list(trainable_variables if trainable_variables is not None else self._trainable_variables)
        grads = list(grads)
        if self.accumulation_steps == 1:
            self.update(grads, variables)
            return
        sums = [self._sums[self._get_variable_index(v)] for v in variables]
        last = ops.equal(self._pass, self.accumulation_steps - 1)
        ops.cond(last, lambda: self._last_pass(grads, variables, sums), lambda: self._add(grads, sums))

    def _add(self, grads: list, sums: list) -> None:
        for g, s in zip(grads, sums):
            if g is not None and s is not None:
                s.assign(ops.add(s, g))
        self._pass.assign_add(1)

    def _last_pass(self, grads: list, variables: list, sums: list) -> None:
        means = [g if g is None or s is None else ops.divide(ops.add(g, s), self.accumulation_steps) for g, s in zip(grads, sums)]
        # The accumulators start again only once the workers have agreed on this update: on a
        # refusal they keep the batches already summed.
        with _backend.after(self.update(means, variables)):
            for s in sums:
                if s is not None:
                    s.assign(ops.zeros_like(s))
            self._pass.assign(0)

    def update(self, grads: list, variables: list) -> list:
        """One update of ``variables`` from this worker's ``grads`` and the other workers'.

        Returns values that exist only once every worker has agreed on the update; every state
        change of the update is ordered after them (:func:`adasum.keras._backend.after`), so
        that on a refusal every worker raises with its weights and its optimizer's state,
        iteration counter included, unchanged, also inside Keras's compiled train step.
        """
        if self.mode == "gradient":
            return self._gradient_update(grads, variables)
        return self._delta_update(grads, variables)

    def _gradient_update(self, grads: list, variables: list) -> list:
        present = [i for i, g in enumerate(grads) if g is not None]
        reduced = _backend.all_reduce([grads[i] for i in present], self.reducer, self._options())
        combined = list(grads)
        for i, g in zip(present, reduced):
            combined[i] = g
        # The step reads the reduced gradients, but its iteration counter does not: it too
        # must wait for the reduction, which refuses a mismatch before any data moves. The
        # first update's broadcast is built inside that wait, so a refusal leaves it undone too.
        with _backend.after(reduced), _backend.after(self._start_equal(variables)):
            self.inner_optimizer.apply(combined, variables)
        return reduced

    def _delta_update(self, grads: list, variables: list) -> list:
        # Every variable takes part, with or without a gradient, so that all workers pass the
        # same tensors whichever gradients they happened to get. They are checked before the
        # local step, so that on a mismatch every worker raises with its state unchanged.
        agreed = [_backend.check([v.value for v in variables], self.reducer, self._options())]
        # The local step starts from rank 0's weights at the first update (after the check).
        with _backend.after(agreed), _backend.after(self._start_equal(variables)):
            start = [ops.copy(v.value) for v in variables]
            self.inner_optimizer.apply(grads, variables)
            deltas = [ops.subtract(v.value, s) for v, s in zip(variables, start)]
            for v, s, d in zip(variables, start, _backend.all_reduce(deltas, self.reducer, self._options())):
                v.assign(ops.add(s, d))
        return agreed

    def _start_equal(self, variables: list) -> list:
        """At the first update only, give every worker rank 0's ``variables``; returns what the
        update's state changes wait for.

        Called once the workers have agreed on the update, so that a refused first update
        leaves each worker's own weights too. Without it, a model that was not built when
        :func:`adasum.keras.broadcast_variables` ran (a ``Sequential`` without ``keras.Input``
        has no variables until ``fit`` traces it) trains a different model on every worker:
        every worker applies the same combined update, each to its own start.
        """
        if not variables:
            return []

        def broadcast() -> Any:
            with _backend.after(_backend.assign_from(variables) or []):
                self._started_equal.assign(1)
            return ops.convert_to_tensor(True)

        first = ops.equal(self._started_equal, 0)
        return [ops.cond(first, broadcast, lambda: ops.convert_to_tensor(False))]

    def _options(self) -> dict[str, object]:
        # What changes when a worker reduces: a worker in another mode, or one that reduces at
        # another batch, would pair its messages with the wrong ones of the others.
        return {"mode": self.mode, "gradient_accumulation_steps": self.accumulation_steps}
