"""adasum.tensorflow on real worker processes (Gloo on localhost): the TensorFlow collective
against the single-process reference adasum.reduce, eagerly and inside tf.function, with 2, 3
and 4 workers. Skipped where TensorFlow is not installed. TensorFlow is imported only in the
workers, so the test process stays light."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import adasum
from adasum.launch import spawn
from conftest import TIMEOUT, caught, rel_err, same_bits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow")

SHAPES = [((6, 4), torch.float32), ((9,), torch.float64), ((3, 5), torch.bfloat16), ((7,), torch.float16)]
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3"}


def rank_inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(90 + rank)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(d) for s, d in SHAPES]


def _to_torch(tensors) -> list[torch.Tensor]:
    return [torch.from_dlpack(t).clone() for t in tensors]


def _collective(rank: int, world: int) -> dict:
    import tensorflow as tf

    from adasum.tensorflow import all_reduce, broadcast, check

    inputs = [tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t)) for t in rank_inputs(rank)]
    graph = tf.function(lambda *ts: all_reduce(list(ts)))
    mine = [tf.fill([2, 3], float(rank))]
    mismatched = [tf.zeros([4, 5]), tf.zeros([5, 4] if rank == world - 1 else [4, 5])]

    def graph_error(fn) -> str | None:
        try:
            tf.function(lambda a, b: fn([a, b]))(*mismatched)
        except tf.errors.OpError as e:
            return e.message
        return None

    counter = tf.Variable(0.0)

    def guarded(a, b):  # the variable changes only once every worker passed the check
        with tf.control_dependencies([check([a, b])]):
            counter.assign_add(1.0)

    def guarded_count(a, b) -> float:
        tf.function(guarded)(a, b)
        return float(counter.numpy())

    return {
        "eager": _to_torch(all_reduce(inputs)),
        "graph": _to_torch(graph(*inputs)),
        "single": _to_torch([all_reduce(inputs[0])]),
        "variable": _to_torch([all_reduce(tf.Variable(inputs[0]))]),
        "average": _to_torch(all_reduce(tuple(inputs), adasum.Average())),
        "inputs_kept": _to_torch(inputs),
        "broadcast": _to_torch(broadcast(mine)),
        "graph_broadcast": _to_torch(tf.function(lambda t: broadcast([t]))(mine[0])),
        "error": caught(lambda: all_reduce(mismatched)),
        "graph_error": graph_error(all_reduce),
        "check_error": caught(lambda: check(mismatched)),
        "graph_check_error": graph_error(check),
        "guarded_error": graph_error(lambda ts: guarded(*ts)),
        "guarded_counter": float(counter.numpy()),
        "guarded_passes": guarded_count(*inputs[:2]),
        "broadcast_error": caught(lambda: broadcast(mismatched)),
        "graph_broadcast_error": graph_error(broadcast),
        "src_error": caught(lambda: broadcast(mine, src=world)),
        "empty_error": caught(lambda: all_reduce([] if rank == world - 1 else mine)),
        "check_passes": bool(check(inputs)),
        "bad_dtype": caught(lambda: all_reduce([tf.zeros([2], tf.int32 if rank == 0 else tf.float32)])),
    }


# One group per worker count runs every check: starting TensorFlow in a worker costs seconds.
@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_collective_on_every_worker(world):
    results = spawn(_collective, world, timeout=TIMEOUT * world, env=QUIET)  # TensorFlow workers start slowly
    equals_the_reference(results, [rank_inputs(r) for r in range(world)])
    bad_input_raises_the_same_error_everywhere(results)
    for r in results:  # broadcast: rank 0's tensors everywhere
        assert torch.equal(r["broadcast"][0], torch.zeros(2, 3))
        assert torch.equal(r["graph_broadcast"][0], torch.zeros(2, 3))


def equals_the_reference(results: list[dict], inputs: list[list[torch.Tensor]]) -> None:
    for rank, r in enumerate(results):
        assert same_bits(r["inputs_kept"], inputs[rank])  # the inputs are not written
        assert same_bits(r["eager"], results[0]["eager"])  # identical bits on every worker
        assert same_bits(r["graph"], r["eager"])  # tf.function: the same computation
        assert same_bits(r["single"], r["eager"][:1])
        assert same_bits(r["variable"], r["eager"][:1])
        assert same_bits(r["average"], results[0]["average"])
    for got, want, (_, dtype) in zip(results[0]["eager"], adasum.reduce(inputs), SHAPES):
        assert got.dtype == dtype
        assert rel_err(got, want) <= (1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6)
    for got, want in zip(results[0]["average"], adasum.Average().reduce(inputs)):
        assert rel_err(got, want) <= 1e-2


def bad_input_raises_the_same_error_everywhere(results: list[dict]) -> None:
    last = len(results) - 1
    shape_error = f"ValueError: adasum: tensor 1 is (5, 4) float32 on rank {last} but (4, 5) float32 on rank 0"
    for r in results:
        assert r["error"] == results[0]["error"]
        assert r["error"].startswith(shape_error), r["error"]
        # Inside a graph TensorFlow re-raises the Python error as its own, with the message.
        assert shape_error.removeprefix("ValueError: ") in r["graph_error"]
        assert r["check_error"] == r["error"]
        assert shape_error.removeprefix("ValueError: ") in r["graph_check_error"]
        assert shape_error.removeprefix("ValueError: ") in r["guarded_error"]
        assert r["guarded_counter"] == 0.0  # the check's result orders the update after it
        assert r["guarded_passes"] == 1.0 and r["check_passes"] is True
        assert r["broadcast_error"] == r["error"]  # broadcast agrees on the layout first
        assert shape_error.removeprefix("ValueError: ") in r["graph_broadcast_error"]
        assert r["empty_error"] == f"ValueError: adasum: rank {last} passed 0 tensors, rank 0 passed 1"
        assert r["src_error"] == f"ValueError: adasum: rank 0: src={last + 1} is not a rank of this group of {last + 1}"
        assert r["bad_dtype"] == results[0]["bad_dtype"]
        assert "int32" in r["bad_dtype"] and r["bad_dtype"].startswith("TypeError")
