"""Torchrun agents on localhost, each standing for a node: what tests/test_nodes.py and
tests/test_elastic.py share to start them, and to end them and their workers whatever happens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
NPROC = 2
#: docs/cluster.md's rendezvous settings for elastic jobs: a dead agent is noticed after 5 missed
#: 1 s heartbeats, and the next rendezvous closes 2 s after its last joiner.
ELASTIC_RDZV_CONF = "join_timeout=120,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=5"


def agent_command(nnodes: str, port: int, run_id: str, conf: str, max_restarts: int, script: Path,
                  *args: str) -> list[str]:
    """torchrun with c10d rendezvous on ``port`` of localhost, NPROC workers per agent."""
    return [str(TORCHRUN), f"--nnodes={nnodes}", f"--nproc-per-node={NPROC}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}", f"--rdzv-conf={conf}",
            f"--max-restarts={max_restarts}", str(script), *args]


def agent_env(**extra: str) -> dict[str, str]:
    """The environment of an agent: one thread per worker, this tree's adasum first."""
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), **extra)


def start_agent(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """One agent, its output in ``log``, in a session of its own (so that it can be ended)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)


def wait_listening(port: int, deadline: float) -> None:
    """Until something accepts connections on ``port`` of localhost (the rendezvous store)."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}") from None
            time.sleep(0.1)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: /proc's children lists). torchrun starts its
    workers in sessions of their own, so ending an agent's session does not reach them."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:  # the task or the process ended meanwhile
            pass
    return [pid] + [d for c in children for d in process_tree(c)]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants at once, as a machine that dies."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def end_agents(procs: list[subprocess.Popen]) -> None:
    """End every agent still running: SIGTERM (torchrun then ends its workers), SIGKILL to the
    agent and its workers after 15 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            p.wait()


def agents_output(logs: list[Path]) -> str:
    return "\n".join(f"--- agent {a}\n{log.read_text()[-3000:]}" for a, log in enumerate(logs))
