"""Elastic training with real torchrun agents: one dies (SIGKILL), later another joins.

Two agents of 2 workers each (``--nnodes=1:2 --max-restarts=2``, c10d rendezvous on localhost)
train tests/elastic_worker.py, which runs gradient mode (DDP with the Adasum hook) and delta mode
(DistributedOptimizer over Adam) side by side and checkpoints every step. The test kills one
agent and its workers with SIGKILL in the middle of the run: the survivors must go on at world
size 2 from the checkpoint at their first restart, within RESTART_LIMIT seconds of the kill.
Then a third agent joins: the job must go on at world size 4. At the end every rank must hold
the same bits, the learning rate must be the one the run started with, and the parameters must
be those of an independent replay in one process (``adasum.reduce`` of the ranks' gradients,
per-rank Adam copies with the ``r mod N`` rule) over the world sizes and resume points the job
went through: no step is lost or taken twice.

The agents run with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docs/cluster.md, "Elastic jobs"):
without it torch hands the workers of every restart the same store, whose keys from the last
incarnation make Gloo connect to dead processes, and a joining agent never gets the store's
address.
"""

from __future__ import annotations

import copy
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import elastic_worker as worker
import pytest
import torch
from agents import ELASTIC_RDZV_CONF, agent_command, agent_env, agents_output, end_agents, kill_tree, start_agent, wait_listening

import adasum
from adasum.launch import free_port
from adasum.optim import local_delta, rank_state
from conftest import rel_err, same_bits

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(420)]

STEPS = 40
#: Steps at world size 4 before the kill, and at world size 2 before the third agent starts.
BEFORE_KILL, BEFORE_JOIN = 6, 3
#: The issue's bound: the job goes on within a minute of losing a node.
RESTART_LIMIT = 60
#: Seconds the whole run may take before the agents are ended and the test fails.
RUN_LIMIT = 360
#: The rendezvous: a lone survivor waits 2 s for more agents before it restarts, and a dead
#: agent is known dead after 5 missed heartbeats of 1 s (the defaults: 30 s and 3 of 5 s).


@dataclass
class Boot:
    """One start of rank 0: wall-clock times (process start, torch imported, group up), the
    world size, the step it resumed from, torchrun's restart count."""

    began: float
    imported: float
    up: float
    world: int
    start: int
    restart: int


class Job:
    """The agents of one run and what their workers wrote."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.cmd = agent_command("1:2", self.port, "adasum-elastic", ELASTIC_RDZV_CONF, 2, Path(worker.__file__),
                                 str(tmp), str(STEPS))
        self.env = agent_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.deadline = time.monotonic() + RUN_LIMIT

    def start(self) -> subprocess.Popen:
        self.logs.append(self.tmp / f"agent{len(self.logs)}.log")
        self.procs.append(start_agent(self.cmd, self.env, self.logs[-1], self.tmp))
        return self.procs[-1]

    def rows(self) -> list[tuple[int, int, int, float]]:
        """progress.txt: (step, world size, restart count, time) per step."""
        path = self.tmp / "progress.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(int(s), int(w), int(r), float(t)) for s, w, r, t in (line.split() for line in lines)]

    def boots(self) -> list[Boot]:
        path = self.tmp / "boots.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        return [Boot(float(b), float(i), float(u), int(w), int(s), int(r))
                for b, i, u, w, s, r in (line.split() for line in lines)]

    def wait_for(self, what: str, ready) -> None:
        """Until ``ready()``; fails with the agents' output if the job ends or time runs out."""
        while not ready():
            if time.monotonic() > self.deadline or all(p.poll() is not None for p in self.procs):
                pytest.fail(f"waiting for {what}: the job ended or ran out of time\n{agents_output(self.logs)}")
            time.sleep(0.1)

    def finish(self, alive: list[subprocess.Popen]) -> None:
        try:
            codes = [p.wait(timeout=max(0.0, self.deadline - time.monotonic())) for p in alive]
        except subprocess.TimeoutExpired:
            codes = None
        assert codes == [0] * len(alive), f"agents exited with {codes}\n{agents_output(self.logs)}"


def run_job(tmp: Path) -> tuple[Job, float, float]:
    """The run: two agents, one killed, one joining. Returns the job, the time of the kill and
    the time the third agent started."""
    job = Job(tmp)
    try:
        survivor = job.start()
        wait_listening(job.port, job.deadline)  # the survivor hosts the rendezvous store
        victim = job.start()
        job.wait_for("4 ranks training", lambda: sum(w == 4 for _, w, _, _ in job.rows()) >= BEFORE_KILL)
        kill_tree(victim.pid)
        killed = time.time()
        job.wait_for("2 ranks training", lambda: sum(t > killed for *_, t in job.rows()) >= BEFORE_JOIN)
        (tmp / "hold").touch()  # so that the run does not end before the third agent is in
        joiner = job.start()
        joined = time.time()
        job.wait_for("4 ranks again", lambda: any(b.world == 4 and b.began > joined for b in job.boots()))
        (tmp / "hold").unlink()
        job.finish([survivor, joiner])
    finally:
        end_agents(job.procs)
    return job, killed, joined


@pytest.fixture(scope="module")
def elastic(tmp_path_factory) -> tuple[Job, float, float]:
    return run_job(tmp_path_factory.mktemp("elastic"))


def test_first_restart_goes_on_within_a_minute(elastic):
    """The first start after the kill trains at world size 2 (restart count 1) within
    RESTART_LIMIT seconds. ``killed`` is taken once kill_tree has ended the agent and then its
    workers, and rank 0 stamps a step's line after that step's collectives, its gather of the
    Adam states and the checkpoint's fsync: a step of the old world whose collectives ended
    while the victims were still alive can be stamped after ``killed``. Such lines are not the
    restart's (this check once failed on one); they must be the old world's (restart 0, world
    4) and in the checkpoint the restart resumed from."""
    job, killed, _ = elastic
    after = [b for b in job.boots() if b.began > killed]
    assert after and after[0].world == 2 and after[0].restart == 1, (after, agents_output(job.logs))
    late = [row for row in job.rows() if row[3] > killed and row[2] == 0]
    assert all(w == 4 and step <= after[0].start for step, w, _, _ in late), (late, after[0])
    first = next(row for row in job.rows() if row[3] > killed and row[2] > 0)
    latency = first[3] - killed
    boot = after[0]
    print(f"\nkill -> first step at world 2: {latency:.1f} s (workers started {boot.began - killed:.1f} s "
          f"after the kill, torch imported after {boot.imported - boot.began:.1f} s, group up after "
          f"{boot.up - boot.imported:.1f} s); old world's steps stamped after the kill: "
          f"{[f'{row[0]} at +{row[3] - killed:.3f} s' for row in late]}")
    assert first[1:3] == (2, 1) and latency < RESTART_LIMIT, (first, latency)


def test_step_count_continues(elastic):
    """Every start resumes from the last checkpoint: at the step the last one reached, or one
    further (checkpointed, not yet logged); the steps then follow one another to the end."""
    job, *_ = elastic
    rows, boots = job.rows(), job.boots()
    for before, now in zip(rows, rows[1:]):
        if now[0] != before[0] + 1:
            resumed = [b.start for b in boots if b.up < now[3]][-1]
            assert resumed in (before[0], before[0] + 1) and now[0] == resumed + 1, (before, now)
    assert rows[-1][0] == STEPS and rows[-1][1] == 4


def test_replicas_identical_and_lr_unchanged(elastic):
    job, *_ = elastic
    finals = [torch.load(job.tmp / f"final{r}.pt", weights_only=True) for r in range(4)]
    for r, final in enumerate(finals):
        assert final["world"] == 4 and final["step"] == STEPS
        assert final["lrs"] == [worker.LR, worker.LR], (r, final["lrs"])
        for mode in ("gradient", "delta"):
            assert same_bits(final[mode], finals[0][mode]), f"{mode}: rank {r} differs from rank 0"


def test_nothing_lost_against_replay(elastic):
    job, *_ = elastic
    final = torch.load(job.tmp / "final0.pt", weights_only=True)
    gradient, delta = replay(segments(job.boots()))
    for got, want in zip(final["gradient"], gradient):
        assert rel_err(got, want) < 1e-5
    for got, want in zip(final["delta"], delta):
        assert rel_err(got, want) < 1e-5


def segments(boots: list[Boot]) -> list[tuple[int, int, int]]:
    """(world size, first step, end step) of every start that trained: each runs from the step
    it resumed from to the step the next one resumed from (later steps were lost with it)."""
    ends = [b.start for b in boots[1:]] + [STEPS]
    return [(b.world, b.start, end) for b, end in zip(boots, ends) if end > b.start]


def replay(runs: list[tuple[int, int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both modes in one process over the given world sizes and steps: gradient mode steps
    momentum SGD on ``adasum.reduce`` of the ranks' gradients; delta mode steps one Adam per
    rank from the shared parameters and adds ``adasum.reduce`` of their deltas. At a change of
    world size new rank r takes old rank r mod N's Adam state."""
    shared = worker.build_model()
    sgd = torch.optim.SGD(shared.parameters(), lr=worker.LR, momentum=worker.MOMENTUM)
    params = list(worker.build_model().parameters())
    states: list[dict] = []
    for world, first, end in runs:
        copies = [worker.build_model() for _ in range(world)]
        adams = [torch.optim.Adam(c.parameters(), lr=worker.LR) for c in copies]
        for r, adam in enumerate(adams):
            if states:  # a copy: ranks r and r + N of a grown world would share the tensors
                adam.load_state_dict(copy.deepcopy(rank_state(states, r)))
        for step in range(first, end):
            grads = []
            for r in range(world):
                shared.zero_grad()
                worker.loss_of(shared, step, r).backward()
                grads.append([p.grad.clone() for p in shared.parameters()])
            for p, g in zip(shared.parameters(), adasum.reduce(grads)):
                p.grad = g
            sgd.step()
            deltas = []
            for r, (model, adam) in enumerate(zip(copies, adams)):
                with torch.no_grad():
                    for c, p in zip(model.parameters(), params):
                        c.copy_(p)
                adam.zero_grad()
                worker.loss_of(model, step, r).backward()
                local_delta(adam, list(model.parameters()), [p.detach().clone() for p in params])
                deltas.append([c.detach().clone() for c in model.parameters()])
            with torch.no_grad():
                for p, d in zip(params, adasum.reduce(deltas)):
                    p.add_(d)
        states = [adam.state_dict() for adam in adams]
    return [p.detach() for p in shared.parameters()], [p.detach() for p in params]
