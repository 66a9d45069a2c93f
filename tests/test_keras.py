"""adasum.keras on real worker processes (Gloo on localhost): ``model.fit`` with the
DistributedOptimizer against an independent replay in one process (each worker's local step,
adasum.reduce of the deltas or gradients, apply), on the TensorFlow and torch backends; and
updates the workers refuse (a layer of another width, another reducer on one worker), which must
leave every worker's weights and optimizer state as they were, also in Keras's compiled train
step, in the same worker processes.
Skipped where Keras or the backend is not installed; Keras is imported only in the workers,
whose environment picks the backend."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch

import adasum
from adasum.launch import spawn
from conftest import TIMEOUT, caught

# Keras workers on both backends take minutes: kept out of the default run (``-m long`` runs them).
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs keras"), pytest.mark.long]

BATCH, UPDATES = 8, 3


def data(world: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's examples for UPDATES updates of ``steps`` batches each."""
    rng = np.random.default_rng(5)
    n = world * UPDATES * steps * BATCH
    return rng.standard_normal((n, 6)).astype("float32"), rng.integers(0, 3, n)


def make_model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)  # a different start on every worker, until broadcast
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def make_inner(mode: str):
    import keras

    return keras.optimizers.Adam(0.05) if mode == "delta" else keras.optimizers.SGD(0.1, momentum=0.9)


def loss_fn():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(rank: int, world: int, mode: str, steps: int, refusals: bool) -> dict:
    import keras

    from adasum.keras import DistributedOptimizer, broadcast_variables

    model = make_model(seed=rank)
    optimizer = DistributedOptimizer(make_inner(mode), mode=mode, gradient_accumulation_steps=steps)
    model.compile(optimizer=optimizer, loss=loss_fn())
    broadcast_variables(model.variables)
    start = [np.array(w) for w in model.get_weights()]
    x, y = data(world, steps)
    model.fit(x[rank::world], y[rank::world], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
    out = {"start": start, "end": [np.array(w) for w in model.get_weights()], "updates": updates}
    if rank == 0:
        out["replay"] = replay(start, world, mode, steps)
    loaded = DistributedOptimizer.from_config(optimizer.get_config())
    out["config"] = (type(loaded.inner_optimizer).__name__, loaded.mode, loaded.accumulation_steps,
                     float(keras.ops.convert_to_numpy(loaded.learning_rate)))
    out["errors"] = {
        "mismatch": caught(lambda: mismatched(rank, world)),
        "inner_accumulates": caught(lambda: DistributedOptimizer(keras.optimizers.SGD(gradient_accumulation_steps=2))),
        "mode": caught(lambda: DistributedOptimizer(keras.optimizers.SGD(), mode="sum")),
        "broadcast": caught(lambda: mismatched_broadcast(rank, world)),
    }
    if refusals:
        out["refused"] = {name: refused_update(rank, world, *case) for name, case in REFUSALS.items()}
    return out


def narrower_on_the_last(rank: int, world: int):
    """A model whose first layer is narrower on the last worker than on the others."""
    import keras

    width = 4 if rank == world - 1 else 5
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(width), keras.layers.Dense(3)])


def snapshot(variables) -> list[bytes]:
    """The values of ``variables``, to compare bit for bit (dtype and shape included)."""
    import keras

    return [repr((a.dtype, a.shape)).encode() + a.tobytes() for a in map(keras.ops.convert_to_numpy, variables)]


def mismatched_broadcast(rank: int, world: int) -> None:
    """broadcast_variables of a model whose last worker has a layer of another width."""
    from adasum.keras import broadcast_variables

    model = narrower_on_the_last(rank, world)
    before = snapshot(model.variables)
    try:
        broadcast_variables(model.variables)
    finally:  # refused before any data moved: nothing changed
        assert snapshot(model.variables) == before


def mismatched(rank: int, world: int) -> None:
    """One update with a model whose last worker has a layer of another width."""
    import keras

    from adasum.keras import DistributedOptimizer

    model = narrower_on_the_last(rank, world)
    model.compile(optimizer=DistributedOptimizer(keras.optimizers.SGD(0.1)), loss=loss_fn(), run_eagerly=True)
    x, y = data(1, 1)
    before = [np.array(w) for w in model.get_weights()]
    try:
        model.train_on_batch(x[:BATCH], y[:BATCH])
    finally:  # refused before the local step: nothing changed
        assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, model.get_weights()))


def gradients(model, x: np.ndarray, y: np.ndarray) -> list:
    """The gradients of the mean loss of one batch, by the backend's own autodiff."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Compiled like fit's train step, so that TensorFlow fuses the same kernels.
        @tf.function
        def taped(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn()(y, model(x, training=True))
            return tape.gradient(loss, model.trainable_variables)

        return taped(x, y)
    model.zero_grad()
    loss = loss_fn()(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
    loss.backward()
    return [v.value.grad.clone() for v in model.trainable_variables]


def accumulated(model, x: np.ndarray, y: np.ndarray, steps: int) -> list:
    """The mean gradient of ``steps`` batches, summed in the order Keras's accumulation uses."""
    from keras import ops

    batches = [gradients(model, x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(steps)]
    if steps == 1:
        return batches[0]
    sums = [ops.zeros_like(g) for g in batches[0]]
    for batch in batches[:-1]:
        sums = [ops.add(s, g) for s, g in zip(sums, batch)]
    return [ops.divide(ops.add(g, s), steps) for g, s in zip(batches[-1], sums)]


def replay(start: list[np.ndarray], world: int, mode: str, steps: int) -> list[np.ndarray]:
    """What the workers should end with, in one process, without the front door."""
    from keras import ops

    x, y = data(world, steps)
    models = [make_model(seed=0) for _ in range(world)]
    inners = [make_inner(mode) for _ in range(world)]
    for m in models:
        m.set_weights(start)
    per_update = steps * BATCH
    for u in range(UPDATES):
        update = slice(u * per_update, (u + 1) * per_update)
        shards = [(x[r::world][update], y[r::world][update]) for r in range(world)]
        weights = [np.array(w) for w in models[0].get_weights()]
        grads = [accumulated(m, xs, ys, steps) for m, (xs, ys) in zip(models, shards)]
        if mode == "gradient":
            combined = adasum.reduce([[torch.as_tensor(np.array(g)) for g in gs] for gs in grads])
            inners[0].apply([ops.convert_to_tensor(c.numpy()) for c in combined], models[0].trainable_variables)
            new = [np.array(w) for w in models[0].get_weights()]
        else:
            deltas = []
            for m, inner, g in zip(models, inners, grads):
                inner.apply(g, m.trainable_variables)
                deltas.append([torch.as_tensor(np.array(w) - s) for w, s in zip(m.get_weights(), weights)])
            new = [s + c.numpy() for s, c in zip(weights, adasum.reduce(deltas))]
        for m in models:
            m.set_weights(new)
    return [np.array(w) for w in models[0].get_weights()]


# Updates the workers refuse change nothing, also inside Keras's compiled train step (the
# TensorFlow backend's default), where operations run in the order of their dependencies.

REFUSALS = {  # name: (mode, batches per update, what differs on the last worker)
    "delta, layout": ("delta", 1, "layout"),
    "gradient, layout": ("gradient", 1, "layout"),
    "delta, reducer": ("delta", 1, "reducer"),
    "gradient accumulated, reducer": ("gradient", 2, "reducer"),
    "delta, mode": ("delta", 1, "mode"),  # the last worker in gradient mode
    "gradient, accumulation": ("gradient", 1, "accumulation"),  # the last worker accumulates 2
}


def refused_update(rank: int, world: int, mode: str, steps: int, differs: str) -> tuple[str, bool]:
    """One update through the default ``fit`` (compiled on the TensorFlow backend) that the
    workers refuse: the error's type and adasum line, and whether every weight and optimizer variable (the
    iteration counters, the moments, the accumulated gradients) kept its bits."""
    from adasum.keras import DistributedOptimizer

    last = rank == world - 1
    if last and differs == "mode":
        mode = "gradient"
    if last and differs == "accumulation":
        steps = 2
    model = narrower_on_the_last(rank, world) if differs == "layout" else make_model(seed=rank)
    reducer = adasum.Average() if differs == "reducer" and last else None
    optimizer = DistributedOptimizer(make_inner(mode), reducer, mode=mode, gradient_accumulation_steps=steps)
    model.compile(optimizer=optimizer, loss=loss_fn())
    optimizer.build(model.trainable_variables)
    x, y = data(1, steps)
    for batch in range(steps - 1):  # accumulated alone: the workers do not communicate yet
        model.fit(x[batch * BATCH : (batch + 1) * BATCH], y[batch * BATCH : (batch + 1) * BATCH], verbose=0)
    state = model.variables + optimizer.variables
    before = snapshot(state)
    try:
        model.fit(x[-BATCH:], y[-BATCH:], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    except Exception as e:  # TensorFlow re-raises the error as one of its own, with the message
        found = re.search(r"adasum: [^\n\x1b]*", str(e))  # to the line's end or a colour code
        message = f"{type(e).__name__}: {found.group(0) if found else e}"
    else:
        message = "no error"
    return message, snapshot(state) == before


def refusals_changed_nothing(results: list[dict], backend: str) -> None:
    """Every worker raised the same error for each refused update, with its state unchanged."""
    last = len(results) - 1
    kind = "InvalidArgumentError" if backend == "tensorflow" else "ValueError"  # graph or eager
    for name in REFUSALS:
        for rank, r in enumerate(results):
            message, unchanged = r["refused"][name]
            assert message == results[0]["refused"][name][0], (name, rank)  # the same words
            assert unchanged, (name, rank, message)
        if name.endswith("layout"):
            want = f"{kind}: adasum: tensor 0 is (6, 4) float32 on rank {last} but (6, 5) float32 on rank 0"
        elif name.endswith("mode"):
            want = f"{kind}: adasum: mode=gradient on rank {last} but mode=delta on rank 0"
        elif name.endswith("accumulation"):
            want = (f"{kind}: adasum: gradient_accumulation_steps=2 on rank {last} "
                    "but gradient_accumulation_steps=1 on rank 0")
        else:
            want = f"{kind}: adasum: reducer=average on rank {last} but reducer=adasum on rank 0"
        assert results[0]["refused"][name][0] == want


CASES = [  # (backend, workers, mode, batches per update, whether the workers also refuse updates)
    ("tensorflow", 2, "delta", 1, True),
    ("tensorflow", 3, "gradient", 1, True),
    ("tensorflow", 4, "delta", 2, False),  # four TensorFlow workers on two cores: slow enough
    ("torch", 3, "delta", 1, True),
    ("torch", 2, "gradient", 3, True),
]


@pytest.mark.parametrize("backend, world, mode, steps, refusals", CASES)
def test_fit_equals_the_replay_on_every_worker(backend, world, mode, steps, refusals):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"needs {backend}")
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # TensorFlow workers take tens of seconds to start each on two cores: the deadline grows
    # with their number (a hang still fails).
    results = spawn(_fit, world, mode, steps, refusals, timeout=TIMEOUT * world, env=env)
    for r in results:  # started equal (broadcast) and stayed bit-identical
        for a, b in zip(r["start"] + r["end"], results[0]["start"] + results[0]["end"]):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert r["updates"] == UPDATES
    inner = "Adam" if mode == "delta" else "SGD"
    assert results[0]["config"] == (inner, mode, steps, float(np.float32(0.05 if mode == "delta" else 0.1)))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(results[0]["start"], results[0]["end"]))
    assert moved > 1e-3
    for got, want in zip(results[0]["end"], results[0]["replay"]):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))  # to the last bit
    errors = [r["errors"] for r in results]
    last = world - 1
    for e in errors:
        assert e == errors[0]  # the same words on every worker
    assert f"on rank {last} but" in errors[0]["mismatch"] and errors[0]["mismatch"].startswith("ValueError")
    assert errors[0]["inner_accumulates"].startswith("ValueError")
    assert errors[0]["mode"].startswith("ValueError")
    assert errors[0]["broadcast"] == f"ValueError: adasum: tensor 0 is (6, 4) float32 on rank {last} but (6, 5) float32 on rank 0"
    if refusals:
        refusals_changed_nothing(results, backend)



def _unbuilt(rank: int, world: int) -> dict:
    """The first-hour mistake: a Sequential without keras.Input is broadcast before fit has
    built it (zero variables), then trained."""
    import keras

    from adasum.keras import DistributedOptimizer, broadcast_variables

    keras.utils.set_random_seed(rank)  # a different start on every worker
    model = keras.Sequential([keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    model.compile(optimizer=DistributedOptimizer(make_inner("delta")), loss=loss_fn())
    refused = caught(lambda: broadcast_variables(model.variables))
    x, y = data(world, 1)
    model.fit(x[rank::world], y[rank::world], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return {"refused": refused, "end": [np.array(w) for w in model.get_weights()]}


def test_an_unbuilt_model_ends_equal_on_every_worker():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("needs tensorflow")
    env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    results = spawn(_unbuilt, 2, timeout=TIMEOUT * 2, env=env)
    # broadcast_variables of nothing is refused, in the same words on every worker
    assert results[0]["refused"] == results[1]["refused"]
    assert results[0]["refused"].startswith(
        "ValueError: adasum: broadcast_variables got no variables: the model is not built yet"
    )
    # and the optimizer's first update still gave both workers rank 0's start (compiled fit)
    assert len(results[0]["end"]) == 4
    for a, b in zip(results[0]["end"], results[1]["end"]):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
