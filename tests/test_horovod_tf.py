"""adasum.horovod.tensorflow and adasum.horovod.keras, Horovod's TensorFlow 2 and Keras API, on
real Gloo groups of 2 and 3 workers.

TensorFlow takes seconds to start in a worker, so one spawn per world size runs everything
(collectives eagerly and in tf.function, gradients, the tape, broadcast_variables, the Keras
optimizer, a small ``fit`` with the callbacks, bad input), and the tests below check its results
against independent references: ``adasum.reduce`` of the inputs as torch tensors, NumPy sums,
gradients and learning rates worked out by hand. Skipped where TensorFlow or Keras is missing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import adasum
from adasum.launch import spawn
from conftest import TIMEOUT, rel_err

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None,
    reason="needs tensorflow and keras")

ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
LR, WARMUP, EPOCHS, STEPS, BATCH = 0.1, 2, 3, 3, 4


def inputs(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    return {
        "f32": rng.standard_normal((6, 4)).astype(np.float32),
        "f64": rng.standard_normal(9),
        "i32": rng.integers(-50, 50, 7).astype(np.int32),
        "rows": np.full((rank + 1, 2), float(rank), np.float32),
        "g1": rng.standard_normal(3).astype(np.float32),
        "g2": rng.standard_normal(3).astype(np.float32),
        "fit_x": rng.standard_normal((STEPS * BATCH, 4)).astype(np.float32),
        "fit_y": rng.standard_normal((STEPS * BATCH, 2)).astype(np.float32),
        "u": rng.integers(0, 60000, 5),
    }


def caught(fn, kind: type[Exception] | None = None) -> str | None:
    """``"TypeName: message"`` of what ``fn()`` raises (TensorFlow's errors by their message);
    with ``kind``, only an error of that class is caught."""
    import tensorflow as tf

    first = kind or tf.errors.OpError
    try:
        fn()
    except first as e:
        return f"{type(e).__name__}: {getattr(e, 'message', e)}"
    except tf.errors.OpError as e:
        return f"{type(e).__name__}: {e.message}"
    except (ValueError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# -- what every worker runs ----------------------------------------------------------------

def _worker(rank: int, world: int) -> dict:
    import adasum.horovod.tensorflow as hvd

    hvd.init()
    out = {"topology": (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())}
    out.update(_collectives(rank, world))
    out.update(_gradients(rank, world))
    out["errors"] = _errors(rank, world)
    out.update(_optimizer(rank))
    out.update(_fit(rank))
    out.update(_late_broadcast(rank))
    hvd.shutdown()
    return out


def _collectives(rank: int, world: int) -> dict:
    import tensorflow as tf

    import adasum.horovod.tensorflow as hvd

    t = {k: tf.constant(v) for k, v in inputs(rank).items()}
    sparse = tf.IndexedSlices(tf.fill([1, 3], float(rank + 1)), tf.constant([rank]), tf.constant([world, 3]))
    results = {
        "adasum": hvd.grouped_allreduce([t["f32"], t["f64"]], op=hvd.Adasum),
        "adasum_graph": tf.function(lambda a, b: hvd.grouped_allreduce([a, b], op=hvd.Adasum))(t["f32"], t["f64"]),
        "adasum_one": [hvd.allreduce(tf.Variable(t["f64"]), op=hvd.Adasum)],
        "adasum_bf16": [tf.cast(hvd.allreduce(tf.cast(t["f32"], tf.bfloat16), op=hvd.Adasum), tf.float32)],
        "average": [hvd.allreduce(t["f32"])],
        "sum_graph": [tf.function(lambda a: hvd.allreduce(a, op=hvd.Sum))(t["f64"])],
        "sum_int": [hvd.allreduce(t["i32"], op=hvd.Sum)],
        "fp16": [hvd.allreduce(t["f32"], op=hvd.Sum, compression=hvd.Compression.fp16)],
        "scaled": [hvd.allreduce(t["f64"], op=hvd.Sum, prescale_factor=0.5, postscale_factor=3.0)],
        "sparse": [tf.convert_to_tensor(hvd.allreduce(sparse, op=hvd.Average))],
        "allgather": [hvd.allgather(t["rows"])],
        "allgather_graph": tf.function(lambda a, b: hvd.grouped_allgather([a, b]))(t["rows"], t["i32"]),
        "broadcast": [hvd.broadcast(t["f32"], root_rank=world - 1)],
    }
    a, b = tf.Variable(t["f32"]), tf.Variable(t["i32"])

    @tf.function
    def assign() -> None:
        hvd.broadcast_variables([a, b], root_rank=1)

    assign()
    results["broadcast_variables"] = [a, b]
    # Unsigned types Gloo lacks travel as same-width types it has; sums are widened.
    for dtype in (tf.uint16, tf.uint32, tf.uint64):
        u = tf.constant(inputs(rank)["u"], dtype)
        results[f"{dtype.name}_moved"] = [hvd.broadcast(u, root_rank=world - 1), hvd.allgather(u)]
        results[f"{dtype.name}_sum"] = [hvd.allreduce(u, op=hvd.Sum)]
    # alltoall: rank r sends r + 1 rows to every rank; reducescatter: this rank's block of the sum.
    rows = tf.fill([world * (rank + 1), 2], float(rank))
    results["alltoall"] = list(tf.function(lambda a: hvd.alltoall(a, splits=[rank + 1] * world))(rows))
    results["alltoall_equal"] = [hvd.alltoall(tf.fill([world, 2], rank))]
    results["reducescatter"] = [hvd.reducescatter(t["f32"], op=hvd.Sum),
                                *hvd.grouped_reducescatter([t["f64"], t["f32"]], op=hvd.Average)]
    with tf.GradientTape() as tape:
        tape.watch(t["f64"])
        scattered = hvd.reducescatter(t["f64"], op=hvd.Sum, postscale_factor=2.0)
    results["reducescatter_grad"] = [tape.gradient(scattered, t["f64"])]
    c = tf.Variable(t["f64"])
    results["broadcast_"] = [*hvd.broadcast_([c], root_rank=world - 1), c]
    return {k: [np.array(x) for x in v] for k, v in results.items()}


def _gradients(rank: int, world: int) -> dict:
    """Gradients through the collectives and the tape, inside tf.function and in a TensorFlow 1
    session."""
    import tensorflow as tf

    import adasum.horovod.tensorflow as hvd

    v = tf.Variable(inputs(rank)["f64"])

    @tf.function
    def through(kind: str):
        with tf.GradientTape() as tape:
            if kind == "sum":
                loss = tf.reduce_sum(hvd.allreduce(v * v, op=hvd.Sum, postscale_factor=2.0))
            elif kind == "allgather":
                gathered = hvd.allgather(tf.reshape(v, [1, -1]))
                loss = tf.reduce_sum(gathered * tf.range(1.0, tf.cast(tf.shape(gathered)[0], tf.float64) + 1)[:, None])
            else:
                loss = tf.reduce_sum(hvd.broadcast(v, root_rank=0)) * (rank + 1)
        return tape.gradient(loss, v)

    w = tf.Variable(tf.zeros([9], tf.float64))

    @tf.function
    def tape_step(op):
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_sum((w - v) ** 2)
        return hvd.DistributedGradientTape(tape, op=op).gradient(loss, [w])[0]

    out = {f"grad_{k}": np.array(through(k)) for k in ("sum", "allgather", "broadcast")}
    with tf.Graph().as_default():  # TensorFlow 1: a session may start the backward allreduce first
        x = tf.constant(inputs(rank)["f64"])
        gathered = hvd.allgather(tf.reshape(x, [1, -1]))
        grad = tf.gradients(gathered, x, tf.ones_like(gathered))[0]
        # One tf.gradients per output of a grouped operation (Horovod's tests): k times the same
        # upstream gradient for output k, so that pairing one rank's output with another's shows.
        parts = [tf.constant(inputs(rank)["rows"]) * k for k in (1, 2, 3)]
        grouped = hvd.grouped_allgather(parts)
        upstream = tf.constant(np.concatenate([np.full((r + 1, 2), r + 1.0, np.float32) for r in range(world)]))
        grouped_grads = [tf.gradients(g, p, upstream * k)[0] for g, p, k in zip(grouped, parts, (1, 2, 3))]
        blocks = [tf.constant(inputs(rank)["f32"]) * k for k in (1, 2, 3)]
        scattered = hvd.grouped_reducescatter(blocks, op=hvd.Sum)
        scattered_grads = [tf.gradients(s, b, tf.ones_like(s) * k)[0] for s, b, k in zip(scattered, blocks, (1, 2, 3))]
        # A grouped allreduce with tf.IndexedSlices: one gather each and one dense reduction.
        sparse = [tf.IndexedSlices(tf.fill([1, 2], k), tf.constant([rank])) for k in (1.0, 2.0)]
        mixed = hvd.grouped_allreduce([sparse[0], tf.fill([2], 3.0), sparse[1]], op=hvd.Sum)
        with tf.compat.v1.Session() as session:
            out["graph_session"] = session.run([gathered, grad])
            out["graph_sparse"] = session.run([mixed[0].values, mixed[1], mixed[2].values])
            out["graph_grouped_allgather"] = session.run(grouped_grads)  # one operation per run: see docs
            out["graph_grouped_reducescatter"] = session.run(scattered_grads)
    out["tape_adasum"], out["tape_average"] = np.array(tape_step(hvd.Adasum)), np.array(tape_step(hvd.Average))
    with hvd.DistributedGradientTape(tf.GradientTape(), op=hvd.Sum) as tape:  # eager, wrapped before recording
        loss = 0.5 * tf.reduce_sum((w - v) ** 2)
    out["tape_eager_sum"] = np.array(tape.gradient(loss, w))
    mine = tf.Variable(tf.zeros([9], tf.float64))  # a layer of this rank's own
    with tf.GradientTape() as tape:
        loss = 0.5 * tf.reduce_sum((w - v) ** 2) + 0.5 * tf.reduce_sum((mine - v) ** 2)
    tape = hvd.DistributedGradientTape(tape, op=hvd.Sum)
    tape.register_local_source(mine)
    out["tape_local"] = [np.array(g) for g in tape.gradient(loss, [w, mine])]
    table = tf.Variable(tf.ones([4, 2], tf.float64))  # an embedding of this rank's own: a sparse gradient
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [rank % 4]))
    tape = hvd.DistributedGradientTape(tape)
    tape.register_local_source(table)
    out["tape_local_sparse"] = np.array(tf.convert_to_tensor(tape.gradient(loss, table)))
    return out


def _errors(rank: int, world: int) -> dict:
    import keras
    import tensorflow as tf

    import adasum.horovod.keras as hvd_keras
    import adasum.horovod.tensorflow as hvd

    last = rank == world - 1
    shape = tf.zeros([3 if last else 2])
    dense = tf.IndexedSlices(tf.ones([1, 2]), tf.constant([0]), tf.constant([2, 2]))
    variable = keras.Variable(np.zeros(4 if last else 3, np.float32))
    keras_opt = hvd_keras.DistributedOptimizer(keras.optimizers.SGD(0.1))
    return {
        "shape": caught(lambda: hvd.allreduce(shape, op=hvd.Adasum)),
        "shape_graph": caught(lambda: tf.function(lambda s: hvd.allreduce(s))(shape)),
        "op": caught(lambda: hvd.allreduce(tf.ones([2]), op=99 if last else hvd.Sum)),
        "root": caught(lambda: hvd.broadcast(tf.ones([2]), root_rank=world)),
        "gather_dims": caught(lambda: hvd.allgather(tf.ones([2, 3 if last else 2]))),
        "adasum_int": caught(lambda: hvd.allreduce(tf.ones([2], tf.int32), op=hvd.Adasum)),
        "adasum_sparse": caught(lambda: hvd.allreduce(dense, op=hvd.Adasum)),
        "not_offered": caught(lambda: hvd.join()),
        "precondition": caught(lambda: hvd.allgather(tf.ones([2, 3 if last else 2])), tf.errors.FailedPreconditionError),
        "global_variables_eager": caught(lambda: hvd.broadcast_global_variables(0), RuntimeError),
        "ops": [int(f()) for f in (hvd.rank_op, hvd.size_op, hvd.local_rank_op, hvd.local_size_op)],
        "names": (hvd.ccl_built(), hvd.ddl_built(), hvd.gpu_available("tensorflow"), hvd.util._executing_eagerly()),
        "keras_op": caught(lambda: hvd_keras.DistributedOptimizer(keras.optimizers.SGD(), op=hvd.Min)),
        "keras_mismatch": caught(lambda: keras_opt.apply([keras.ops.ones_like(variable)], [variable])),
        "tf_optimizer": caught(lambda: hvd.DistributedOptimizer(object())),
        "tf_optimizer_keras": type(hvd.DistributedOptimizer(keras.optimizers.SGD(), op=hvd.Adasum)).__module__,
        "still_works": float(hvd.allreduce(tf.constant(float(rank)), op=hvd.Sum)),
    }


def _optimizer(rank: int) -> dict:
    """Two applies of two backward passes each: Horovod's sum of the passes (op=Sum), or their
    mean (average_aggregated_gradients=True), then one update."""
    import keras

    import adasum.horovod.keras as hvd

    x = inputs(rank)
    out = {}
    for label, op, averaged in (("sum", hvd.Sum, False), ("adasum_mean", hvd.Adasum, True)):
        variable = keras.Variable(np.zeros(3, np.float32))
        opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.5), op=op, backward_passes_per_step=2,
                                       average_aggregated_gradients=averaged)
        opt.apply([keras.ops.convert_to_tensor(x["g1"])], [variable])
        out[f"opt_{label}_after_one"] = np.array(variable)
        opt.apply([keras.ops.convert_to_tensor(x["g2"])], [variable])
        out[f"opt_{label}"] = np.array(variable)
        config = hvd.DistributedOptimizer.from_config(opt.get_config()).get_config()
        out[f"opt_{label}_config"] = (config["op"], config["backward_passes_per_step"],
                                      config["average_aggregated_gradients"])
    return out


def _fit(rank: int) -> dict:
    import keras

    import adasum.horovod.keras as hvd

    class Record(keras.callbacks.Callback):
        """What the callbacks before it left: the start, each batch's rate, the epoch's logs."""

        def __init__(self) -> None:
            super().__init__()
            self.start, self.rates, self.logs = None, [], []

        def on_train_begin(self, logs=None) -> None:
            self.start = [np.array(w) for w in self.model.get_weights()]

        def on_train_batch_begin(self, batch, logs=None) -> None:
            self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.logs.append(dict(logs))

    keras.utils.set_random_seed(rank)  # a different start on every rank, until the broadcast
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    initial = [np.array(w) for w in model.get_weights()]
    optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9), op=hvd.Adasum,
                                         backward_passes_per_step=2)  # accumulation inside the compiled step
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    raw, seen = Record(), Record()
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), raw, hvd.callbacks.MetricAverageCallback(),
                 hvd.callbacks.LearningRateWarmupCallback(initial_lr=LR, warmup_epochs=WARMUP), seen]
    x = inputs(rank)
    model.fit(x["fit_x"], x["fit_y"], batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
    out = {"fit_initial": initial, "fit_start": seen.start, "fit_end": [np.array(w) for w in model.get_weights()],
           "fit_rates": seen.rates, "fit_raw_logs": raw.logs, "fit_logs": seen.logs,
           "fit_updates": int(keras.ops.convert_to_numpy(optimizer.iterations))}
    # Momentum correction: halving the rate halves the SGD velocity.
    velocity = [np.array(m) for m in model.optimizer.inner_optimizer.momentums]
    halve = hvd.callbacks.LearningRateScheduleCallback(initial_lr=LR, multiplier=0.5, start_epoch=0)
    halve.set_model(model)
    halve.on_epoch_begin(1)
    halve.on_train_batch_begin(0)
    out["corrected"] = (velocity, [np.array(m) for m in model.optimizer.inner_optimizer.momentums],
                        float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    out["keras_values"] = (hvd.allreduce(float(rank)), hvd.allgather([rank]), hvd.broadcast([rank, 7], root_rank=1))
    return out


def _late_broadcast(rank: int) -> dict:
    """A model that has no variables before its first step (no keras.Input): the callback
    broadcasts after the first batch, so every rank ends with the same weights."""
    import keras

    import adasum.horovod.keras as hvd

    keras.utils.set_random_seed(rank)
    model = keras.Sequential([keras.layers.Dense(2)])
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(LR)), loss="mse")
    x = inputs(rank)
    model.fit(x["fit_x"], x["fit_y"], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    return {"late_weights": [np.array(w) for w in model.get_weights()]}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}workers")
def run(request) -> tuple[int, list[dict]]:
    world = request.param
    # Three workers starting TensorFlow on a busy 2-core machine took over TIMEOUT seconds.
    return world, spawn(_worker, world, timeout=3 * TIMEOUT, env=ENV)


# -- the checks ----------------------------------------------------------------------------

def _same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                    for x, y in zip(a, b))


def test_collectives_equal_the_references(run):
    world, results = run
    x = [inputs(r) for r in range(world)]
    for r, res in enumerate(results):
        assert res["topology"] == (r, world, r, world)
        for key in ("adasum", "adasum_graph", "adasum_one", "adasum_bf16", "average", "sum_graph", "fp16",
                    "allgather", "broadcast_variables"):
            assert _same_bits(res[key], results[0][key]), key  # identical bits on every rank
    res = results[0]
    assert _same_bits(res["adasum_graph"], res["adasum"])  # tf.function: the same computation
    reference = adasum.reduce([[torch.from_numpy(i["f32"]), torch.from_numpy(i["f64"])] for i in x])
    for got, want in zip(res["adasum"], reference):
        assert rel_err(torch.from_numpy(got), want) <= 1e-6
    assert rel_err(torch.from_numpy(res["adasum_one"][0]), reference[1]) <= 1e-12
    bf16 = adasum.reduce([[torch.from_numpy(i["f32"]).bfloat16()] for i in x])[0]
    assert rel_err(torch.from_numpy(res["adasum_bf16"][0]), bf16.float()) <= 1e-2
    total = {k: sum(i[k].astype(np.float64) for i in x) for k in ("f32", "f64")}
    np.testing.assert_allclose(res["average"][0], total["f32"] / world, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["sum_graph"][0], total["f64"], rtol=1e-12)
    assert np.array_equal(res["sum_int"][0], sum(i["i32"] for i in x)) and res["sum_int"][0].dtype == np.int32
    assert res["fp16"][0].dtype == np.float32
    np.testing.assert_allclose(res["fp16"][0], total["f32"], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(res["scaled"][0], 1.5 * total["f64"], rtol=1e-12)
    dense = np.zeros((world, 3), np.float32)
    for r in range(world):
        dense[r] = (r + 1) / world
    np.testing.assert_allclose(res["sparse"][0], dense, rtol=1e-6)
    assert np.array_equal(res["allgather"][0], np.concatenate([i["rows"] for i in x]))
    assert np.array_equal(res["allgather_graph"][1], np.concatenate([i["i32"] for i in x]))
    assert np.array_equal(res["broadcast"][0], x[-1]["f32"])
    assert np.array_equal(res["broadcast_variables"][0], x[1]["f32"])
    assert np.array_equal(res["broadcast_variables"][1], x[1]["i32"])
    for dtype in (np.uint16, np.uint32, np.uint64):
        name = np.dtype(dtype).name
        sent, gathered = res[f"{name}_moved"]
        assert sent.dtype == dtype and np.array_equal(sent, x[-1]["u"].astype(dtype))
        assert np.array_equal(gathered, np.concatenate([i["u"] for i in x]).astype(dtype))
        assert res[f"{name}_sum"][0].dtype == dtype
        assert np.array_equal(res[f"{name}_sum"][0], sum(i["u"] for i in x).astype(dtype))  # wrapped as the type would
    out, received = res["alltoall"]
    assert np.array_equal(received, np.arange(1, world + 1))
    assert np.array_equal(out, np.repeat(np.arange(world, dtype=np.float32), np.arange(1, world + 1))[:, None] * [1, 1])
    for r, each in enumerate(results):  # equal parts: one row from every rank
        assert np.array_equal(each["alltoall_equal"][0], np.repeat(np.arange(world), 2).reshape(world, 2))
        block = [slice(r * q + min(r, m), (r + 1) * q + min(r + 1, m)) for q, m in (divmod(6, world), divmod(9, world))]
        np.testing.assert_allclose(each["reducescatter"][0], total["f32"][block[0]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(each["reducescatter"][1], total["f64"][block[1]] / world, rtol=1e-12)
        np.testing.assert_allclose(each["reducescatter"][2], total["f32"][block[0]] / world, rtol=1e-5, atol=1e-6)
        # Horovod's gradient: the allgathered ones, times the postscale factor and the ranks (Sum).
        assert np.array_equal(each["reducescatter_grad"][0], np.full(9, 2.0 * world))
    new_value, variable = res["broadcast_"]
    assert np.array_equal(new_value, x[-1]["f64"]) and np.array_equal(variable, x[-1]["f64"])


def test_gradients_are_horovods(run):
    world, results = run
    for r, res in enumerate(results):
        v = inputs(r)["f64"]
        # Sum with postscale 2: the output gradient (ones) summed over the ranks, times 2, times 2v.
        np.testing.assert_allclose(res["grad_sum"], 4.0 * world * v, rtol=1e-12)
        # allgather: this rank's row of the output gradient averaged over ranks (the same on all).
        assert np.array_equal(res["grad_allgather"], np.full(9, r + 1.0))
        # broadcast: the averaged output gradient on the root, zero elsewhere.
        expected = np.full(9, (world + 1) / 2) if r == 0 else np.zeros(9)
        np.testing.assert_allclose(res["grad_broadcast"], expected, rtol=1e-12)
        gathered, grad = res["graph_session"]  # in a session, the allgather before its gradient
        assert np.array_equal(gathered, np.stack([inputs(i)["f64"] for i in range(world)]))
        assert np.array_equal(grad, np.ones(9))
        # Several tf.gradients of one grouped operation in one session.run: each its own.
        for k, g in zip((1, 2, 3), res["graph_grouped_allgather"]):
            assert np.array_equal(g, np.full((r + 1, 2), k * (r + 1.0), np.float32))
        for k, g in zip((1, 2, 3), res["graph_grouped_reducescatter"]):
            assert np.array_equal(g, np.full((6, 4), k * world, np.float32))
        first, dense, second = res["graph_sparse"]
        assert np.array_equal(first, np.ones((world, 2))) and np.array_equal(second, np.full((world, 2), 2.0))
        assert np.array_equal(dense, np.full(2, 3.0 * world))


def test_distributed_gradient_tape(run):
    world, results = run
    local = [torch.from_numpy(-inputs(r)["f64"]) for r in range(world)]  # the gradient of 0.5|w - v|^2 at w = 0
    for res in results:
        assert _same_bits([res["tape_adasum"]], [results[0]["tape_adasum"]])
        assert rel_err(torch.from_numpy(res["tape_adasum"]), adasum.reduce([[g] for g in local])[0]) <= 1e-12
        np.testing.assert_allclose(res["tape_average"], sum(local).numpy() / world, rtol=1e-12)
        np.testing.assert_allclose(res["tape_eager_sum"], sum(local).numpy(), rtol=1e-12)
    for r, res in enumerate(results):  # a local source keeps its own gradient, divided by the ranks
        shared, own = res["tape_local"]
        np.testing.assert_allclose(shared, sum(local).numpy(), rtol=1e-12)
        np.testing.assert_allclose(own, local[r].numpy() / world, rtol=1e-12)
        sparse = np.zeros((4, 2))
        sparse[r % 4] = 1.0 / world
        np.testing.assert_allclose(res["tape_local_sparse"], sparse, rtol=1e-12)


def test_keras_optimizer_accumulates_as_horovod(run):
    world, results = run
    x = [inputs(r) for r in range(world)]
    passes = [torch.from_numpy(i["g1"].astype(np.float64) + i["g2"]) for i in x]
    for res in results:
        assert np.array_equal(res["opt_sum_after_one"], np.zeros(3, np.float32))  # one pass: no update yet
        np.testing.assert_allclose(res["opt_sum"], -0.5 * sum(passes).numpy(), rtol=1e-5)
        deltas = [[-0.5 * p / 2] for p in passes]  # delta mode: each rank's SGD step on its mean
        assert rel_err(torch.from_numpy(res["opt_adasum_mean"]).double(), adasum.reduce(deltas)[0]) <= 1e-5
        assert _same_bits([res["opt_adasum_mean"]], [results[0]["opt_adasum_mean"]])
        assert res["opt_sum_config"] == (1, 2, False) and res["opt_adasum_mean_config"] == (2, 2, True)


def test_broadcast_after_the_first_batch_when_the_model_has_no_variables_before(run):
    world, results = run
    assert len(results[0]["late_weights"]) == 2
    for res in results:
        assert _same_bits(res["late_weights"], results[0]["late_weights"])


def test_keras_fit_with_the_callbacks(run):
    world, results = run
    for res in results:
        assert _same_bits(res["fit_start"], results[0]["fit_initial"])  # rank 0's weights before the first step
        assert _same_bits(res["fit_end"], results[0]["fit_end"])
        assert res["fit_logs"] == results[0]["fit_logs"]
        assert res["fit_updates"] == EPOCHS * STEPS // 2
    moved = max(float(np.abs(a - b).max()) for a, b in zip(results[0]["fit_start"], results[0]["fit_end"]))
    assert moved > 1e-3
    for epoch in range(EPOCHS):  # the averaged metrics are the mean of the ranks' own
        for name in ("loss", "mae"):
            mean = np.mean([res["fit_raw_logs"][epoch][name] for res in results])
            assert results[0]["fit_logs"][epoch][name] == pytest.approx(mean, rel=1e-12)
    # Warm-up: from LR/world towards LR, linear in the batches, reaching LR with the last
    # warm-up batch; afterwards it stays there.
    want = []
    for epoch in range(EPOCHS):
        for batch in range(STEPS):
            done = min((epoch + (batch + 1) / STEPS) / WARMUP, 1.0)
            want.append(LR / world * (1 + done * (world - 1)))
    np.testing.assert_allclose(results[0]["fit_rates"], want, rtol=1e-6)
    assert results[0]["fit_logs"][-1]["lr"] == pytest.approx(LR, rel=1e-6)
    before, after, rate = results[0]["corrected"]
    assert rate == pytest.approx(LR / 2, rel=1e-6)
    assert any(np.abs(b).max() > 0 for b in before)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b / 2, rtol=1e-6)
    for res in results:
        mean, gathered, sent = res["keras_values"]
        assert mean == pytest.approx((world - 1) / 2) and gathered.tolist() == list(range(world))
        assert sent.tolist() == [1, 7]


def test_bad_input_raises_on_every_rank(run):
    world, results = run
    errors = [dict(res["errors"]) for res in results]
    last = world - 1
    shape = f"MismatchError: hvd.allreduce: tensor 0 is (3,) float32 cpu on rank {last} but (2,) float32 cpu on rank 0"
    for e in errors:
        # Inside tf.function: TensorFlow's error (its text names each rank's own graph node),
        # carrying the same message.
        graph = e.pop("shape_graph")
        e.pop("ops")  # each rank's own rank
        assert graph.startswith("InvalidArgumentError") and shape in graph
        assert e == errors[0]  # the same words on every rank
    e = errors[0]
    assert e["shape"] == shape
    # A rank's own invalid input: InvalidArgumentError as in Horovod; ranks that differ: FailedPrecondition.
    assert e["op"].startswith(f"InvalidInputError: hvd.allreduce: rank {last}: op=99 is not one of")
    assert e["root"].startswith("InvalidInputError: hvd.broadcast: rank 0: root_rank=")
    assert e["gather_dims"].startswith("MismatchError: hvd.allgather: tensor 0 is (*, 3)")
    assert e["adasum_int"].startswith("InvalidInputError: hvd.allreduce: rank 0: tensor 0 is int32; Adasum needs")
    assert e["adasum_sparse"].startswith("NotImplementedError") and "sparse_as_dense=True" in e["adasum_sparse"]
    assert e["not_offered"].startswith("NotImplementedError: adasum.horovod.tensorflow.join is not offered; give")
    assert e["precondition"].startswith("MismatchError: hvd.allgather: tensor 0 is (*, 3)")  # Horovod's error class
    assert e["global_variables_eager"].startswith("RuntimeError: hvd.broadcast_global_variables() does not work eagerly")
    assert e["names"] == (False, False, torch.cuda.is_available(), True)
    for r, res in enumerate(results):
        assert res["errors"]["ops"] == [r, world, r, world]
    assert e["keras_op"].startswith("ValueError: op must be")
    assert e["keras_mismatch"].startswith("ValueError") and f"on rank {last} but" in e["keras_mismatch"]
    assert e["tf_optimizer"].startswith("TypeError: adasum.horovod.tensorflow.DistributedOptimizer wraps a keras")
    assert e["tf_optimizer_keras"] == "adasum.horovod.keras._optimizer"
    assert e["still_works"] == sum(range(world))  # the group survives all of the above
