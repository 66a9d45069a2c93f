"""Hierarchical Adasum on real Gloo groups, with node layouts declared on one machine.

6 processes run as 3 nodes of 2, 2 nodes of 3, 6 nodes of 1 and one node of 6 (the single-node
fallback); 4 processes as 2 nodes of 2, with the layout taken from LOCAL_WORLD_SIZE, through the
DDP hook and the delta-mode optimizer as well. The parent checks every result against the
definition: average inside each node, then ``adasum.reduce`` over the node averages.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import adasum
from adasum._hierarchical import split_layers
from adasum.ddp import AdasumState, adasum_hook
from adasum.launch import spawn
from adasum.optim import DistributedOptimizer
from conftest import TIMEOUT, bits, caught

SHAPES = [((7, 5), torch.float32), ((13,), torch.float64), ((4, 4), torch.bfloat16),
          ((3,), torch.float32), ((50,), torch.float32), ((2, 3), torch.float64)]
TOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2}


def rank_inputs(rank: int) -> list[torch.Tensor]:
    """Multiples of 1/16 of moderate size: sums of them are exact in every dtype here, so the
    node average is one rounding (the division) wherever it is computed."""
    g = torch.Generator().manual_seed(rank)
    out = [(torch.randint(-64, 65, shape, generator=g).to(torch.float64) / 16).to(dtype) for shape, dtype in SHAPES]
    out[3].zero_()  # a layer that is zero everywhere stays zero
    return out


def definition(inputs: list[list[torch.Tensor]], local_size: int, stats: bool = False):
    """Node averages (half precision averaged in float32), then adasum.reduce over nodes."""
    nodes = len(inputs) // local_size
    averages = []
    for k in range(nodes):
        node = inputs[k * local_size : (k + 1) * local_size]
        layer_avgs = []
        for i in range(len(node[0])):
            layers = torch.stack([r[i] for r in node])
            work = layers.float() if layers.dtype == torch.bfloat16 else layers
            layer_avgs.append((work.sum(0) / local_size).to(layers.dtype))
        averages.append(layer_avgs)
    return adasum.reduce(averages, stats=stats)


def _layouts(rank: int, world: int, local_sizes: list[int]) -> dict:
    out = {}
    for local_size in local_sizes:
        h = adasum.Hierarchical(local_size)
        tensors = rank_inputs(rank)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            tree = h.all_reduce(tensors, stats=True)
        quiet = rank_inputs(rank)
        h.all_reduce(quiet)
        flat = torch.cat([t.reshape(-1) for t in rank_inputs(rank) if t.dtype == torch.float32])
        numels = [t.numel() for t in rank_inputs(rank) if t.dtype == torch.float32]
        h.all_reduce_flat(flat, numels)
        out[local_size] = {
            "result": tensors, "without_stats": quiet, "stats": tree.stages, "flat": flat, "nodes": h.nodes,
            "single_node": h.single_node, "warnings": [str(w.message) for w in warned],
        }
    out["bad_layout"] = caught(lambda: adasum.Hierarchical(4).all_reduce(torch.ones(2)))
    # The same validation as the flat collective, before any data moves.
    h = adasum.Hierarchical(local_sizes[0])
    shape = (4, 5) if rank == world - 1 else (5, 4)
    out["shape_error"] = caught(lambda: h.all_reduce([torch.ones(3), torch.ones(shape)]))
    dtype = torch.float64 if rank == 0 else torch.float32
    out["dtype_error"] = caught(lambda: h.all_reduce([torch.ones(3, dtype=dtype)]))
    out["count_error"] = caught(lambda: h.all_reduce([torch.ones(2)] * (2 if rank == 1 else 1)))
    out["empty_error"] = caught(lambda: h.all_reduce([] if rank == 1 else [torch.ones(2)]))
    out["stats_error"] = caught(lambda: h.all_reduce(torch.ones(2), stats=rank == 0))
    out["type_error"] = caught(lambda: h.all_reduce([torch.ones(3, dtype=torch.int32) if rank == 2 else torch.ones(3)]))
    return out


def _six(rank: int, world: int) -> dict:
    return _layouts(rank, world, [2, 3, 1, 6])


def _training(rank: int, world: int) -> dict:
    out = _layouts(rank, world, [2])
    h = adasum.Hierarchical()  # LOCAL_WORLD_SIZE=2 from the environment
    out["env_layout"] = (h.nodes, h.local_size, h.node, h.local_rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    shadow = copy.deepcopy(model)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    torch.nn.functional.mse_loss(shadow(x), y).backward()
    out["local"] = [p.grad.clone() for p in shadow.parameters()]
    ddp = DDP(model, bucket_cap_mb=0.0001)
    ddp.register_comm_hook(AdasumState(h), adasum_hook)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    out["hook"] = [p.grad.clone() for p in model.parameters()]
    # Delta mode over the hierarchy with plain SGD: the delta is -lr * local gradient.
    plain = copy.deepcopy(shadow)
    for p, grad in zip(plain.parameters(), out["local"]):
        p.grad = grad.clone()  # deepcopy leaves gradients behind
    opt = DistributedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.5), h)
    out["start"] = [p.detach().clone() for p in plain.parameters()]
    opt.step()
    out["delta_mode"] = [p.detach().clone() for p in plain.parameters()]
    return out


@pytest.fixture(scope="module")
def six() -> list[dict]:
    return spawn(_six, 6, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def four() -> list[dict]:
    return spawn(_training, 4, timeout=TIMEOUT, env={"LOCAL_WORLD_SIZE": "2"})


def check_layout(runs: list[dict], local_size: int, expect_local: int) -> None:
    world = len(runs)
    res = [r[local_size] for r in runs]
    assert res[0]["nodes"] == world // expect_local
    for r in res:
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(r["result"], r["without_stats"]))
    for r in res[1:]:
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(res[0]["result"], r["result"]))
        assert torch.equal(bits(res[0]["flat"]), bits(r["flat"]))
    inputs = [rank_inputs(r) for r in range(world)]
    expected, tree = definition(inputs, expect_local, stats=True)
    for got, want in zip(res[0]["result"], expected):
        assert got.dtype == want.dtype
        assert torch.allclose(got.double(), want.double(), rtol=TOL[got.dtype], atol=TOL[got.dtype])
    assert torch.count_nonzero(res[0]["result"][3]) == 0
    assert len(res[0]["stats"]) == len(tree.stages)
    for got, want in zip(res[0]["stats"], tree.stages):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    flat_expected = torch.cat([t.reshape(-1) for t in expected if t.dtype == torch.float32])
    assert torch.allclose(res[0]["flat"], flat_expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("local_size", [2, 3, 1], ids=["3x2", "2x3", "6x1"])
def test_six_ranks(six, local_size):
    check_layout(six, local_size, local_size)
    assert not six[0][local_size]["single_node"] and not six[0][local_size]["warnings"]


def test_single_node_warns_and_applies_adasum_across_ranks(six):
    assert six[0][6]["single_node"]
    assert any("one node" in w for w in six[0][6]["warnings"])
    check_layout(six, 6, 1)  # every rank counts as a node


def test_layout_must_divide_the_world(six):
    assert all("cannot be split" in r["bad_layout"] for r in six)


def test_bad_input_raises_the_same_error_on_every_rank(six):
    world = len(six)
    for r in six:
        assert r["shape_error"] == (
            f"ValueError: adasum: tensor 1 is (4, 5) float32 on rank {world - 1} but (5, 4) float32 on rank 0")
        assert r["dtype_error"].startswith("ValueError: adasum: tensor 0 is (3,) float32 on rank 1 but (3,) float64 on rank 0")
        assert r["count_error"] == "ValueError: adasum: rank 1 passed 2 tensors, rank 0 passed 1"
        assert r["empty_error"] == "ValueError: adasum: rank 1 passed 0 tensors, rank 0 passed 1"
        assert r["stats_error"] == "ValueError: adasum: stats=False on rank 1 but stats=True on rank 0"
        assert r["type_error"].startswith("TypeError: adasum: rank 2: tensor 0 is int32")


def test_two_by_two_and_training_paths(four):
    check_layout(four, 2, 2)
    assert [r["env_layout"] for r in four] == [(2, 2, 0, 0), (2, 2, 0, 1), (2, 2, 1, 0), (2, 2, 1, 1)]
    local = [r["local"] for r in four]
    expected = definition(local, 2)
    for r in four:
        for got, want in zip(r["hook"], expected):
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(r["hook"], four[0]["hook"]))
    deltas = [[-0.5 * g for g in rank_grads] for rank_grads in local]
    moved = definition(deltas, 2)
    for got, start, step in zip(four[0]["delta_mode"], four[0]["start"], moved):
        assert torch.allclose(got, start + step, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("offsets,parts", [([0, 10, 20, 30], 3), ([0, 100], 2), ([0, 1, 2, 3, 100], 2),
                                           ([0], 3), ([0, 5, 5, 9], 4)])
def test_split_layers_covers_every_layer_once(offsets, parts):
    ranges = split_layers(offsets, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == len(offsets) - 1
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
    total = offsets[-1]
    for a, b in ranges[:-1]:
        largest = max((offsets[i + 1] - offsets[i] for i in range(a, b)), default=0)
        assert offsets[b] - offsets[a] <= total / parts + largest
