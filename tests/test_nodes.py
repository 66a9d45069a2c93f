"""Multi-node on one machine: torchrun agents on localhost meeting through c10d rendezvous.

Each agent stands for a node (``--nnodes``, ``--nproc-per-node=2``, one ``--rdzv-id`` and
endpoint, as on a cluster); its workers run tests/nodes_worker.py, which reduces with flat
Adasum, :class:`adasum.Hierarchical` (its node size from torchrun's ``LOCAL_WORLD_SIZE``), the
DDP hook and delta mode, and saves what it got. The tests compute the same here, in one process,
with ``adasum.reduce`` and ``Hierarchical(local_size).reduce``, and check that every rank holds
the same bits. Two launches: two agents with ``--nnodes=2``, and three with elastic bounds
``--nnodes=2:3`` (three nodes: a world of 6, and an odd number of nodes for the cross-node
Adasum).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import nodes_worker as worker
import pytest
import torch
from agents import NPROC, agent_command, agent_env, agents_output, end_agents, start_agent

import adasum
from adasum.launch import free_port
from conftest import rel_err, same_bits

#: Real torchrun agents: kept out of the default run (``-m long`` runs them).
pytestmark = pytest.mark.long

#: Seconds one launch may take (rendezvous, 4-6 workers importing torch on 2 shared cores, the
#: reductions) before every agent is ended and the test fails.
LAUNCH_TIMEOUT = 180
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 100 * 2**-7}


def launch(tmp: Path, nnodes: str, agents: int) -> list[dict]:
    """Start ``agents`` torchrun agents of 2 workers each, as separate nodes would, and return
    the ranks' results in rank order. A launch that fails or outlives LAUNCH_TIMEOUT fails the
    test with the agents' output; on timeout the agents are terminated (torchrun then ends
    their workers) and, failing that, killed."""
    # Each agent waits for the others up to the launch's own limit: with elastic bounds the
    # rendezvous closes only when every agent has joined (the maximum) or after last_call_timeout.
    conf = f"join_timeout={LAUNCH_TIMEOUT},last_call_timeout={LAUNCH_TIMEOUT}"
    cmd = agent_command(nnodes, free_port(), "adasum-nodes", conf, 0, Path(worker.__file__), str(tmp))
    logs = [tmp / f"agent{a}.log" for a in range(agents)]
    procs = [start_agent(cmd, agent_env(), log, tmp) for log in logs]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        end_agents(procs)
    output = agents_output(logs)
    assert codes is not None, f"the launch did not finish in {LAUNCH_TIMEOUT} s\n{output}"
    assert codes == [0] * agents, f"agents exited with {codes}\n{output}"
    world = agents * NPROC
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("two"), "2", 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("three"), "2:3", 3)


def local_gradients(rank: int) -> list[torch.Tensor]:
    model = worker.build_model()
    worker.loss_of(model, rank).backward()
    return [p.grad.clone() for p in model.parameters()]


def local_deltas(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters before the step and rank ``rank``'s own Adam update of them."""
    model = worker.build_model()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=worker.LR)
    worker.loss_of(model, rank).backward()
    opt.step()
    return start, [p.detach() - s for p, s in zip(model.parameters(), start)]


def references() -> dict[str, adasum.Reducer]:
    """The single-process reference of each reducer the workers used."""
    return {"adasum": adasum.Adasum(), "hierarchical": adasum.Hierarchical(local_size=NPROC)}


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
        assert rel_err(g, w) <= TOL[g.dtype], (what, i, rel_err(g, w))


def assert_identical(runs: list[dict], key: str) -> None:
    for r, res in enumerate(runs[1:], start=1):
        assert same_bits(runs[0][key], res[key]), f"{key}: rank {r} differs from rank 0"


def check_layout(runs: list[dict], agents: int) -> None:
    """torchrun numbered each agent's workers contiguously, and Hierarchical's node of a rank
    is the agent (GROUP_RANK) that started it."""
    world = agents * NPROC
    for r, res in enumerate(runs):
        env, layout = res["env"], res["layout"]
        assert env["RANK"] == r and env["WORLD_SIZE"] == world and env["GROUP_WORLD_SIZE"] == agents
        assert env["LOCAL_WORLD_SIZE"] == NPROC == layout["local_size"]
        assert (layout["node"], layout["local_rank"]) == (env["GROUP_RANK"], env["LOCAL_RANK"])
        assert layout["nodes"] == agents and not layout["single_node"]


def check_results(runs: list[dict]) -> None:
    world = len(runs)
    inputs = [worker.rank_inputs(r) for r in range(world)]
    flat = adasum.reduce(inputs)
    for algorithm in ("vhdd", "gather"):
        assert_identical(runs, f"flat_{algorithm}")
        assert_close(runs[0][f"flat_{algorithm}"], flat, f"flat_{algorithm}")
    assert_identical(runs, "hierarchical")
    assert_close(runs[0]["hierarchical"], adasum.Hierarchical(local_size=NPROC).reduce(inputs), "hierarchical")
    assert torch.count_nonzero(runs[0]["hierarchical"][3]) == 0
    grads = [local_gradients(r) for r in range(world)]
    starts, deltas = zip(*(local_deltas(r) for r in range(world)))
    for name, reducer in references().items():
        assert_identical(runs, f"hook_{name}")
        assert_close(runs[0][f"hook_{name}"], reducer.reduce(grads), f"hook_{name}")
        assert_identical(runs, f"delta_{name}")
        moved = [s + d for s, d in zip(starts[0], reducer.reduce(list(deltas)))]
        assert_close(runs[0][f"delta_{name}"], moved, f"delta_{name}")


def test_two_agents(two):
    check_layout(two, agents=2)
    check_results(two)


def test_three_agents_within_elastic_bounds(three):
    check_layout(three, agents=3)
    check_results(three)
