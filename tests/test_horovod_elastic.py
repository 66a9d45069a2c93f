"""hvd.elastic (TorchState, ElasticSampler, run) on real Gloo groups, and under torchrun agents.

The default tests run two worlds one after the other on one directory, as torchrun's agents
would after a change of world: a world of 2 ranks trains, commits, trains on, restores; a world
of 3 then starts from the commit. The parent checks every rank's results against references it
computes itself: the partition of the dataset, the committed bits, rank r's delta-mode state
taken from old rank r mod 2, every index processed once over both worlds.

The long tests run examples/horovod_elastic.py on 2 workers for one epoch and then, in the
same directory, on 3 workers (it must go on from its commit); and start two torchrun agents
(tests/horovod_elastic_worker.py), kill one with SIGKILL in the middle of the run, and check
that the survivor's workers continue from the last commit on 2 ranks, with bit-identical
replicas at the end.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import time
from pathlib import Path

import horovod_elastic_worker as worker
import pytest
import torch
from agents import (
    ELASTIC_RDZV_CONF,
    ROOT,
    TORCHRUN,
    agent_command,
    agent_env,
    agents_output,
    end_agents,
    kill_tree,
    start_agent,
    wait_listening,
)

import adasum.horovod as hvd
from adasum.launch import free_port, spawn
from conftest import TIMEOUT, raised, same_bits

DATASET, BATCH, SEED = 23, 2, 5
#: The index the last rank of the first world records by record_indices before its commit.
EXTRA = -1


def models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)


def build(seed: int) -> tuple[hvd.elastic.TorchState, list]:
    """The state every rank builds: a delta-mode model (Adam, Adasum), a gradient-mode one
    (momentum SGD, averaged gradients), a sampler, plain attributes. Parameters drawn from
    ``seed``: sync() must replace them by rank 0's."""
    delta, grad = models(seed)
    adam = hvd.DistributedOptimizer(torch.optim.Adam(delta.parameters(), lr=0.1),
                                    named_parameters=delta.named_parameters(), op=hvd.Adasum)
    sgd = hvd.DistributedOptimizer(torch.optim.SGD(grad.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=grad.named_parameters())
    sampler = hvd.elastic.ElasticSampler(list(range(DATASET)), seed=SEED)
    state = hvd.elastic.TorchState(delta, adam, grad=grad, sgd=sgd, sampler=sampler, epoch=seed, batch=0, seen=[])
    return state, [*delta.parameters(), *grad.parameters()]


def step(state: hvd.elastic.TorchState, indices: torch.Tensor) -> None:
    """One step of both models on the examples ``indices`` (each example drawn from its index)."""
    x = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(int(i))) for i in indices])
    for model, opt in ((state.model, state.optimizer), (state.grad, state.sgd)):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def params(ps: list) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps]


def loader(state: hvd.elastic.TorchState) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(state.sampler.dataset, batch_size=BATCH, sampler=state.sampler)


def _first_world(rank: int, world: int) -> dict:
    """Sync, two batches, commit (the last rank also records EXTRA), a third batch, restore."""
    hvd.init()
    state, ps = build(seed=rank)
    out: dict = {}

    @hvd.elastic.run
    def train(state):
        out.update(synced=params(ps), epoch=state.epoch, batches=[])
        for b, indices in enumerate(loader(state)):
            step(state, indices)
            state.sampler.record_batch(b, BATCH)
            state.batch = b + 1
            state.seen.append(indices.tolist())
            out["batches"].append(indices.tolist())
            if b == 1:
                if rank == world - 1:
                    state.sampler.record_indices([state.sampler.indices[EXTRA]])
                state.commit()
                out.update(committed=params(ps), adam=copy.deepcopy(state.optimizer.state_dict()))
            if b == 2:
                break
        state.restore()
        out.update(restored=params(ps), batch=state.batch, seen=state.seen, processed=state.sampler.processed_indices)

    train(state)
    hvd.shutdown()
    return out


def _second_world(rank: int, world: int) -> dict:
    """Start from the first world's commit, train the rest of the epoch, commit. First, with
    the last rank looking at an empty directory, loading the commit must fail on every rank."""
    hvd.init()
    state, ps = build(seed=100 + rank)
    resets: list[int] = []
    state.register_reset_callbacks([lambda: resets.append(hvd.size())])
    out: dict = {}
    shared = os.environ["ADASUM_ELASTIC_DIR"]
    if rank == world - 1:
        os.environ["ADASUM_ELASTIC_DIR"] = os.path.join(shared, "elsewhere")
    out["unshared"] = raised(state.load_commit)
    os.environ["ADASUM_ELASTIC_DIR"] = shared

    @hvd.elastic.run
    def train(state):
        out.update(loaded=params(ps), adam=copy.deepcopy(state.optimizer.state_dict()), batch=state.batch, seen=list(state.seen),
                   resets=list(resets), batches=[])
        for b, indices in enumerate(loader(state)):
            step(state, indices)
            state.sampler.record_batch(b, BATCH)
            out["batches"].append(indices.tolist())
        state.commit()
        out.update(final=params(ps), processed=state.sampler.processed_num)

    train(state)
    hvd.shutdown()
    return out


def partition(processed: set[int], world: int) -> list[list[list[int]]]:
    """Reference: every rank's batches. The epoch's order is random.Random(SEED) applied to
    0..DATASET-1; the unprocessed indices in that order, repeated from the start up to a
    multiple of ``world``, are dealt out one per rank in turn."""
    order = list(range(DATASET))
    random.Random(SEED).shuffle(order)
    left = [i for i in order if i not in processed]
    per_rank = -(-len(left) // world)
    dealt: list[list[int]] = [[] for _ in range(world)]
    for k in range(per_rank * world):
        dealt[k % world].append(left[k % len(left)])
    return [[d[j:j + BATCH] for j in range(0, per_rank, BATCH)] for d in dealt]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> tuple[Path, list[dict], dict, list[dict]]:
    directory = tmp_path_factory.mktemp("elastic")
    env = {"ADASUM_ELASTIC_DIR": str(directory)}
    first = spawn(_first_world, 2, timeout=TIMEOUT, env=env)
    committed = torch.load(directory / "commit.pt", weights_only=False)
    second = spawn(_second_world, 3, timeout=TIMEOUT, env=env)
    return directory, first, committed, second


def test_sync_gives_every_rank_rank_0s_state(worlds):
    _, first, _, _ = worlds
    delta, grad = models(seed=0)
    want = params([*delta.parameters(), *grad.parameters()])
    for out in first:
        assert same_bits(out["synced"], want) and out["epoch"] == 0


def test_sampler_partitions_as_the_reference(worlds):
    _, first, _, _ = worlds
    batches = partition(set(), 2)
    for rank, out in enumerate(first):
        assert out["batches"] == batches[rank][:3]


def test_restore_returns_to_the_commit(worlds):
    _, first, _, _ = worlds
    for out in first:
        assert same_bits(out["restored"], out["committed"]) and same_bits(out["committed"], first[0]["committed"])
        assert not same_bits(out["committed"], out["synced"])  # the steps moved them
        assert out["batch"] == 2 and out["seen"] == out["batches"][:2]
    batches = partition(set(), 2)
    recorded = {i for rank in range(2) for b in batches[rank][:2] for i in b}
    extra = [i for b in batches[1] for i in b][EXTRA]
    for out in first:  # the commit united the ranks' records
        assert out["processed"] == recorded | {extra}


def test_commit_file(worlds):
    _, first, committed, _ = worlds
    assert committed["commit"] == 1 and committed["world"] == 2
    assert committed["objects"] == {"epoch": 0, "batch": 2, "seen": first[0]["batches"][:2]}
    handlers = committed["handlers"]
    assert same_bits([*handlers["model"].values(), *handlers["grad"].values()], first[0]["committed"])
    # Delta mode: every rank's own moments; gradient mode: one state.
    assert len(handlers["optimizer"]) == 2
    for rank, out in enumerate(first):
        for key in ("exp_avg", "exp_avg_sq"):
            assert same_bits([s[key] for s in handlers["optimizer"][rank]["state"].values()],
                             [s[key] for s in out["adam"]["state"].values()])
    assert not same_bits(handlers["optimizer"][0]["state"][0]["exp_avg"], handlers["optimizer"][1]["state"][0]["exp_avg"])
    assert set(handlers["sgd"]["state"]) == {0, 1}


def test_ranks_seeing_different_commits_all_raise(worlds):
    *_, second = worlds
    for out in second:
        assert out["unshared"].startswith("RuntimeError: adasum.horovod.elastic: the ranks see different commits")
        assert "([1, 1, None], in rank order; None: no file): $ADASUM_ELASTIC_DIR must be a directory every node sees" \
            in out["unshared"]


def test_restart_continues_from_the_commit(worlds):
    _, first, committed, second = worlds
    for rank, out in enumerate(second):
        assert same_bits(out["loaded"], first[0]["committed"])
        assert out["resets"] == [3] and out["batch"] == 2 and out["seen"] == first[0]["batches"][:2]
        old = committed["handlers"]["optimizer"][rank % 2]  # rank r takes old rank r mod 2's moments
        for key in ("exp_avg", "exp_avg_sq"):
            assert same_bits([s[key] for s in out["adam"]["state"].values()], [s[key] for s in old["state"].values()])


def test_restart_processes_only_the_unseen_indices(worlds):
    _, _, committed, second = worlds
    done = set(committed["handlers"]["sampler"]["processed_indices"].tolist())
    batches = partition(done, 3)
    for rank, out in enumerate(second):
        assert out["batches"] == batches[rank]
        assert same_bits(out["final"], second[0]["final"])
        assert out["processed"] == DATASET
    after = [i for out in second for b in out["batches"] for i in b]
    assert set(after) == set(range(DATASET)) - done and not done & set(after)


# -- torchrun agents: one is killed ----------------------------------------------------------

#: Steps on 4 ranks before the kill; the job's length.
BEFORE_KILL, STEPS = 4, 30
RUN_LIMIT = 300


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(RUN_LIMIT + 60)
def test_agent_killed_job_continues_from_the_commit(tmp_path):
    port = free_port()
    cmd = agent_command("1:2", port, "adasum-hvd-elastic", ELASTIC_RDZV_CONF, 2, Path(worker.__file__), str(tmp_path),
                        str(STEPS))
    env = agent_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", ADASUM_ELASTIC_DIR=str(tmp_path / "commits"))
    logs = [tmp_path / "agent0.log", tmp_path / "agent1.log"]
    deadline = time.monotonic() + RUN_LIMIT
    procs = []
    try:
        procs.append(start_agent(cmd, env, logs[0], tmp_path))
        wait_listening(port, deadline)  # the survivor hosts the rendezvous store
        procs.append(start_agent(cmd, env, logs[1], tmp_path))
        while sum(row[1] == 4 for row in worker.progress(tmp_path)) < BEFORE_KILL:
            assert time.monotonic() < deadline and procs[0].poll() is None, agents_output(logs)
            time.sleep(0.1)
        kill_tree(procs[1].pid)
        killed = time.time()
        assert procs[0].wait(timeout=max(1.0, deadline - time.monotonic())) == 0, agents_output(logs)
    finally:
        end_agents(procs)
    rows, boots = worker.progress(tmp_path), worker.boots(tmp_path)
    assert boots[-1][1] == 2 and boots[-1][3] > killed, boots
    after = [row for row in rows if row[3] > boots[-1][3]]  # the survivors' steps
    print(f"\nkill -> first step on 2 ranks: {after[0][3] - killed:.1f} s (the new workers started "
          f"{boots[-1][4] - killed:.1f} s after the kill, and were in train() {boots[-1][3] - boots[-1][4]:.1f} s "
          f"later); starts (step, world): {[b[:2] for b in boots]}; steps {[r[0] for r in rows]}")
    # Every step follows the one before, except after a restart: then it follows the commit
    # the workers started from, which is the last step logged or the one after it (committed,
    # then the worker was killed before it logged).
    for before, now in zip(rows, rows[1:]):
        if now[0] != before[0] + 1:
            start = [b[0] for b in boots if b[3] < now[3]][-1]
            assert start in (before[0], before[0] + 1) and now[0] == start + 1, (before, now, boots)
    # The step in flight may finish on 4 ranks (the victims had sent their part) before the
    # survivors fail; no other.
    assert len([row for row in rows if row[3] > killed and row[1] == 4]) <= 1, rows
    assert all(row[1] == 2 for row in after)
    assert rows[-1][:2] == (STEPS, 2)
    finals = [torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in range(2)]
    assert all(f["step"] == STEPS and f["world"] == 2 for f in finals)
    assert same_bits(finals[0]["params"], finals[1]["params"])


@pytest.mark.slow
@pytest.mark.long
def test_example_continues_on_another_world(tmp_path):
    """examples/horovod_elastic.py: one epoch on 2 workers, then a job of 3 epochs on 3 workers
    in the same directory, which goes on from the first job's last commit."""
    env = agent_env(ADASUM_ELASTIC_DIR=str(tmp_path / "commits"))
    printed = []
    for workers, epochs in ((2, 1), (3, 3)):
        done = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={workers}",
                               str(ROOT / "examples" / "horovod_elastic.py"), "--use-adasum", "--epochs", str(epochs)],
                              env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        printed += [line.split() for line in done.stdout.splitlines() if line.startswith("epoch")]
    # epoch E: N workers, S steps, loss L. 2048 examples in batches of 32: 32 batches per
    # epoch on 2 workers, 22 on 3 (the last one short).
    assert [(w[1], w[2], w[4]) for w in printed] == [("0:", "2", "32"), ("1:", "3", "54"), ("2:", "3", "76")], printed
    losses = [float(w[-1]) for w in printed]
    assert losses[2] < losses[0], printed
