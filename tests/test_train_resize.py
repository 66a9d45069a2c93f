"""``adasum train`` resumed on another number of workers, as an elastic job's restart does:
the plan that continues the run (:mod:`adasum.lab.resume`), a 3-worker run resumed on 2
workers through the program's own spawn against the simulator, and (long) torchrun jobs that
lose an agent and its workers to SIGKILL, or gain an agent, and finish with ``--auto-resume``."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from agents import (
    ELASTIC_RDZV_CONF,
    ROOT,
    agent_command,
    agent_env,
    agents_output,
    end_agents,
    kill_tree,
    start_agent,
    wait_listening,
)
from test_train import assert_same_curve, losses

from adasum.lab.cli import main
from adasum.lab.config import RunConfig, Steps
from adasum.lab.resume import plan_run, split
from adasum.lab.simulate import simulate_run
from adasum.lab.tasks import load_task
from adasum.lab.train import load_checkpoint
from adasum.launch import free_port


def _state(plan: Steps, step: int, target: int = 96) -> dict:
    """What a checkpoint of ``plan`` after ``step`` steps of a run begun with ``target``
    examples per step tells the next plan."""
    c = plan.config
    return {"workers": plan.workers, "step": step, "position": tuple(plan.position(step)),
            "examples_per_step": target, "plan": {"batch": c.batch, "accum": c.accum}}


def _taken(plan: Steps) -> list[tuple[int, list[int]]]:
    return [(step, idx.tolist()) for step, idx in plan.batches()]


def test_split_keeps_the_step_size_when_the_workers_divide_it():
    assert split(96, 2, 16) == (16, 3)
    assert split(96, 4, 16) == (12, 2)   # 24 each: the largest micro-batch <= 16 that divides it
    assert split(96, 5, 16) == (16, 1)   # 19 each do not split: one whole micro-batch, E = 80
    assert split(3, 5, 16) == (1, 1)     # at least one example each


@pytest.mark.parametrize("step", [0, 9, 10, 14, 29])
def test_the_same_step_size_on_fewer_workers_takes_the_same_steps(step):
    config = RunConfig(batch=16, accum=2, epochs=3, schedule="cosine")
    before = Steps(config, 3, 1000)
    run = plan_run(config, 2, 1000, _state(before, step))
    assert (run.config.batch, run.config.accum, run.plan.per_step) == (16, 3, 96)
    assert run.plan.total_steps == before.total_steps
    assert _taken(run.plan) == _taken(before)[step:]
    assert [run.plan.lr_at(s) for s in range(step, 30)] == [before.lr_at(s) for s in range(step, 30)]
    assert "96 examples per step kept (3 micro-batches of 16 per worker; the checkpoint's: 2 of 16)" in run.note


def test_another_step_size_finishes_the_epoch_and_says_so():
    """96 examples on 5 workers: 80 per step from the middle of epoch 1 on; that epoch's
    examples are taken once each, from where the old plan stopped, and the plan ends after
    the last epoch."""
    config = RunConfig(batch=16, accum=2, epochs=3)
    before = Steps(config, 3, 1000)
    run = plan_run(config, 5, 1000, _state(before, 14))
    assert run.plan.per_step == 80 and run.plan.origin.offset == 4 * 96
    steps = _taken(run.plan)
    assert [s for s, _ in steps] == list(range(14, run.plan.total_steps))
    epoch1 = [i for _, idx in _taken(before)[10:14] for i in idx]
    epoch1 += [i for s, idx in steps if run.plan.position(s).epoch == 1 for i in idx]
    assert len(epoch1) == len(set(epoch1)) == 4 * 96 + 7 * 80   # (1000 - 384) // 80 = 7 steps
    assert run.plan.total_steps == 14 + 7 + 12 and run.plan.ends_epoch(21) and run.plan.position(33).epoch == 3
    assert run.note.endswith("96 examples per step do not split over 5 workers: 80 per step from here "
                             "(1 micro-batch of 16 per worker); 33 steps in all instead of 30, the "
                             "learning-rate schedule spread over them")
    # Back on 3 workers: the step size the run began with.
    again = plan_run(config, 3, 1000, _state(run.plan, 20))
    assert again.plan.per_step == 96 and "96 examples per step kept" in again.note


def _simulated(task, config: RunConfig, workers: int, **kwargs) -> list[dict]:
    return simulate_run(task, config, workers, distances=False, **kwargs)[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_three_workers_resumed_on_two_follow_the_simulator(tmp_path, capsys):
    """Delta mode (every rank's own Adam moments) with accumulation: one epoch on 3 workers,
    then ``--auto-resume`` on 2 to the second. E = 48 stays (3 micro-batches of 8 per worker
    instead of 2); the simulator resumed from its own checkpoint after one epoch on 2 workers
    (rank r taking old rank r mod 3's moments) is the reference. The replicas end bit-identical.
    (The generated linear task: no data set to load in 5 processes.)"""
    options = {"task": "linear", "samples": 512, "optimizer": "adam", "lr": 0.01, "batch": 8, "accum": 2}
    args = [*(f"--{k}={v}" for k, v in options.items()), "--out", str(tmp_path), "--no-progress", "--auto-resume"]
    assert main(["train", "--nproc", "3", "--epochs", "1", *args]) == 0
    first = losses(tmp_path / "history.csv")
    capsys.readouterr()
    assert main(["train", "--nproc", "2", "--epochs", "2", *args]) == 0
    assert capsys.readouterr().err == (f"adasum: resuming step {len(first)} of a run written by 3 workers on 2: 48 "
                                       "examples per step kept (3 micro-batches of 8 per worker; the "
                                       "checkpoint's: 2 of 8)\n")
    resumed = losses(tmp_path / "history.csv")
    config = RunConfig(**options, epochs=2)
    task = load_task("linear", samples=512)
    saved: list[dict] = []
    reference = _simulated(task, config.with_(epochs=1), 3, on_epoch=saved.append)
    reference += _simulated(task, config.with_(accum=3), 2, resume=saved[0])
    assert resumed[:len(first)] == first and len(first) > 5
    assert_same_curve(resumed, [r["loss"] for r in reference])
    written = json.loads((tmp_path / "history.json").read_text())
    assert len(written["digests"]) == 2 and len(set(written["digests"])) == 1
    assert (written["summary"]["workers"], written["summary"]["examples_per_step"]) == (2, 48)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["workers"], state["step"], state["plan"]) == (2, len(resumed), {"batch": 8, "accum": 3})


# ------------------------------------------------------------------ torchrun, an agent killed

#: 4 workers (2 agents of 2), E = 32: 44 steps an epoch on digits; long enough that the kill,
#: made as soon as the first epoch's checkpoint is there, falls in the middle of the run.
EPOCHS = 8
RUN_LIMIT = 300


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(RUN_LIMIT + 60)
def test_torchrun_job_loses_an_agent_and_finishes_with_auto_resume(tmp_path):
    """The recipe of docs/cluster.md with ``adasum train --auto-resume`` as the script: two
    agents (``--nnodes=1:2``), one killed with its workers after the first epoch's checkpoint;
    the survivor's restarted workers resume from the last epoch checkpoint on 2 workers with
    E = 32 kept (2 micro-batches of 8 instead of 1) and finish the run. The losses are those of
    the simulator over the same stretches, and the replicas end bit-identical."""
    out, port, start, logs, deadline = _job(tmp_path)
    procs = []
    try:
        procs.append(start(0))
        wait_listening(port, deadline)  # the survivor hosts the rendezvous
        procs.append(start(1))
        _wait_for_checkpoint(out, procs[0], deadline, logs)
        kill_tree(procs[1].pid)
        code = procs[0].wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, agents_output(logs)
    finally:
        end_agents(procs)
    note = re.search(r"resuming step (\d+) of a run written by 4 workers on 2: 32 examples per step kept "
                     r"\(2 micro-batches of 8 per worker; the checkpoint's: 1 of 8\)", logs[0].read_text())
    assert note, agents_output(logs)
    _assert_follows_the_simulator(out, int(note.group(1)), 4, 2, accum=2)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(RUN_LIMIT + 60)
def test_torchrun_job_grows_when_an_agent_joins(tmp_path):
    """The other direction: one agent of ``--nnodes=1:2`` starts alone (2 workers, E = 16);
    a second joins after the first epoch's checkpoint, torchrun restarts the workers as a
    world of 4, and ``--auto-resume`` continues from the last epoch checkpoint with E = 16
    kept (1 micro-batch of 4 instead of 8). The losses are the simulator's over the same
    stretches; the 4 replicas end bit-identical."""
    out, _, start, logs, deadline = _job(tmp_path)
    procs = []
    try:
        procs.append(start(0))
        _wait_for_checkpoint(out, procs[0], deadline, logs)
        procs.append(start(1))
        for p in procs:
            assert p.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, agents_output(logs)
    finally:
        end_agents(procs)
    text = logs[0].read_text() + logs[1].read_text()
    note = re.search(r"resuming step (\d+) of a run written by 2 workers on 4: 16 examples per step kept "
                     r"\(1 micro-batch of 4 per worker; the checkpoint's: 1 of 8\)", text)
    assert note, agents_output(logs)
    _assert_follows_the_simulator(out, int(note.group(1)), 2, 4, batch=4)


def _job(tmp_path):
    """The elastic job of the two tests above (``--nnodes=1:2``, ``adasum train --auto-resume``
    as the script): its --out, its rendezvous port, ``start(i)`` that starts agent i, the
    agents' logs, and the deadline."""
    out = tmp_path / "run"
    options = ["--optimizer", "adam", "--lr", "0.003", "--batch", "8", "--epochs", str(EPOCHS)]
    port = free_port()
    cmd = agent_command("1:2", port, "adasum-train", ELASTIC_RDZV_CONF, 2, ROOT / "src/adasum/lab/__main__.py",
                        "train", *options, "--out", str(out), "--auto-resume", "--no-progress")
    env = agent_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    logs = [tmp_path / "agent0.log", tmp_path / "agent1.log"]
    return out, port, lambda i: start_agent(cmd, env, logs[i], tmp_path), logs, time.monotonic() + RUN_LIMIT


def _wait_for_checkpoint(out, agent, deadline: float, logs) -> None:
    """Until the run's first checkpoint exists, while ``agent`` runs."""
    while not (out / "checkpoint.pt").exists():
        assert agent.poll() is None and time.monotonic() < deadline, agents_output(logs)
        time.sleep(0.02)


def _assert_follows_the_simulator(out, step: int, before: int, after: int, **resumed) -> None:
    """The run in ``out``, resumed at ``step`` on ``after`` workers (with ``resumed`` changing
    its configuration) from an epoch checkpoint of ``before`` workers: its losses are the
    simulator's over the same stretches, its steps numbered without a gap, and its ``after``
    replicas ended bit-identical."""
    task = load_task("digits-mlp")
    config = RunConfig(optimizer="adam", lr=0.003, batch=8, epochs=EPOCHS)
    epochs = step // Steps(config, before, task.train_size).steps_per_epoch
    assert 0 < epochs < EPOCHS  # resized in the middle, resumed from an epoch's checkpoint
    saved: list[dict] = []
    reference = _simulated(task, config.with_(epochs=epochs), before, on_epoch=saved.append)
    reference += _simulated(task, config.with_(**resumed), after, resume=saved[-1])
    assert_same_curve(losses(out / "history.csv"), [r["loss"] for r in reference])
    written = json.loads((out / "history.json").read_text())
    assert len(written["digests"]) == after and len(set(written["digests"])) == 1
    assert torch.tensor([r["step"] for r in written["history"]]).equal(torch.arange(1, len(reference) + 1))
