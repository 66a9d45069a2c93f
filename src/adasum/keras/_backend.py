"""The two things the Keras front door needs from the backend Keras runs on: reduce a list of
backend tensors across the workers, and give every worker rank 0's variables.

TensorFlow's tensors go through :mod:`adasum.tensorflow` (DLPack into the PyTorch engine, and
a ``tf.py_function`` node inside Keras's compiled train step). The torch backend's tensors are
torch tensors already: the reducer works on them in place. JAX's train step is one traced,
stateless function that cannot call the engine; :mod:`adasum.jax` is the way there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import keras
import torch.distributed as dist

from adasum._broadcast import broadcast
from adasum._reducer import Reducer

__all__ = ["BACKENDS", "check_backend", "all_reduce", "check", "after", "broadcast_variables", "assign_from"]

BACKENDS = ("tensorflow", "torch")


def check_backend() -> str:
    """The Keras backend, or ValueError if the front door cannot run on it."""
    name = keras.backend.backend()
    if name not in BACKENDS:
        hint = " (for JAX, use adasum.jax with Optax)" if name == "jax" else ""
        raise ValueError(f"adasum.keras runs on the tensorflow and torch backends, not {name!r}{hint}")
    return name


def all_reduce(values: Sequence[Any], reducer: Reducer, options: Mapping[str, object]) -> list[Any]:
    """``reducer``'s reduction of every worker's ``values`` (backend tensors we may overwrite),
    as a list of backend tensors; ``options`` must be alike on every worker
    (:meth:`adasum.Reducer.check`)."""
    if keras.backend.backend() == "tensorflow":
        from adasum.tensorflow import all_reduce as tf_all_reduce

        return tf_all_reduce(list(values), reducer, options=options)
    values = list(values)
    reducer.all_reduce(values, options=options)
    return values


def check(values: Sequence[Any], reducer: Reducer, options: Mapping[str, object]) -> Any:
    """``reducer``'s validation of ``values`` and ``options`` alone: the same error on every
    worker, or none. Returns what :func:`after` orders later operations after (None on the
    torch backend)."""
    if keras.backend.backend() == "tensorflow":
        from adasum.tensorflow import check as tf_check

        return tf_check(list(values), reducer, options=options)
    reducer.check(list(values), options=options)
    return None


def after(results: Sequence[Any]) -> AbstractContextManager:
    """A context whose operations wait for ``results`` (of :func:`check` or :func:`all_reduce`).

    Inside Keras's compiled TensorFlow step, operations run in the order of their dependencies,
    not of the code: an optimizer step that nothing ties to the check runs beside it and has
    changed the weights by the time the check fails. Eagerly, and on the torch backend, the
    code's order is the order, and the context does nothing.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.control_dependencies(list(results))
    return contextlib.nullcontext()


def broadcast_variables(
    variables: Sequence[keras.Variable], src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Assign rank ``src``'s values to ``variables`` on every worker. The workers first agree
    on the shapes, dtypes and ``src``: on a difference every worker raises the same ValueError
    with its variables unchanged.

    Zero variables is refused with a ValueError on every worker: it is what
    ``model.variables`` holds before the model is built (a ``keras.Sequential`` without a
    ``keras.Input``), and a broadcast of nothing would leave every worker with its own start.
    """
    variables = list(variables)
    # The workers agree even on an empty list, so that one that passes nothing while the others
    # pass variables raises the agreement's error with them instead of leaving them waiting.
    assign_from(variables, src, group)
    if not variables:
        raise ValueError(
            "adasum: broadcast_variables got no variables: the model is not built yet. Build it "
            "first (keras.Input as its first layer, or model.build(input_shape)), then broadcast "
            "model.variables"
        )


def assign_from(variables: Sequence[keras.Variable], src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """:func:`broadcast_variables` without the refusal of an empty list, also inside a graph;
    returns what :func:`after` orders later operations after (None on the torch backend)."""
    variables = list(variables)
    if check_backend() == "tensorflow":
        from adasum.tensorflow import broadcast as tf_broadcast

        values = tf_broadcast([v.value for v in variables], src, group)
        for v, value in zip(variables, values):
            v.assign(value)
        return values
    broadcast([v.value.data for v in variables], src, group)
    return None
