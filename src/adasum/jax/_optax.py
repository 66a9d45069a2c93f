"""Optax transformations around :func:`adasum.jax.all_reduce`: delta mode and gradient mode.

Delta mode is the general one: each device runs an inner optimizer on its own gradients and
the updates it produces, ``new - old`` of the parameters, are replaced by their Adasum over the
devices. Gradient mode is delta mode around the identity, whose updates are the gradients.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from adasum.jax._collective import all_reduce

if TYPE_CHECKING:
    import optax

__all__ = ["adasum_deltas", "adasum_gradients"]


def adasum_deltas(
    inner: optax.GradientTransformation, axis_name: Hashable
) -> optax.GradientTransformationExtraArgs:
    """Delta mode: run ``inner`` (an Optax transformation) on each device's own gradients and
    replace the resulting updates by their Adasum over ``axis_name`` (:func:`all_reduce`).

    An Optax update is exactly the parameter delta ``new - old``, so with identical parameters
    on every device, ``optax.apply_updates(params, updates)`` sets ``params = old +
    Adasum(deltas)`` everywhere. The inner state (Adam's moments, say) is updated from the local
    gradients only and differs between devices: keep it per device (for ``shard_map``, with a
    leading axis sharded over ``axis_name``). Use this inside ``shard_map`` or ``pmap``. Extra
    arguments of ``update`` are passed to ``inner``.
    """
    # Imported here so that all_reduce works where Optax is not installed.
    import optax

    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra_args):
        deltas, state = inner.update(updates, state, params, **extra_args)
        return all_reduce(deltas, axis_name), state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def adasum_gradients(axis_name: Hashable) -> optax.GradientTransformationExtraArgs:
    """Gradient mode: replace the gradients by their Adasum over ``axis_name``.

    Chain it before the optimizer, e.g. ``optax.chain(adasum_gradients("data"), optax.sgd(lr))``;
    the optimizer then sees identical gradients on every device, so its state stays identical.
    Stateless. Fine for SGD and momentum; for Adam or LAMB use :func:`adasum` (delta mode).
    """
    import optax

    # The identity's update is the gradient itself, so its "delta" is what gets reduced.
    return adasum_deltas(optax.identity(), axis_name)
