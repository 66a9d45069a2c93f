"""adasum._exit: at interpreter exit the process groups are gone and their Gloo threads joined.

Real processes (two Gloo ranks, each a plain `python` started here, so that the interpreter's
own exit runs, which multiprocessing's children skip). Each script builds an optimizer after
``init_process_group``: torch then freezes the default group into torch.distributed.nn's
defaults, where ``destroy_process_group`` alone leaves it and its threads alive. A hook
registered before adasum's runs after it and counts the threads besides the main one.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from adasum import Adasum
from adasum.launch import free_port
from conftest import TIMEOUT

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc/self/task")

SCRIPT = """
import atexit, os, sys
import torch, torch.distributed as dist

def other_threads():
    # All of them, named or not: a Gloo thread takes its name only once it first runs.
    return len(os.listdir("/proc/self/task")) - 1

atexit.register(lambda: print(f"other threads at exit: {other_threads()}", flush=True))
dist.init_process_group("gloo")
import adasum
if sys.argv[1] == "unpickled":  # the reducer arrives pickled, as in a Ray worker
    import pickle
    reducer = pickle.loads(open(sys.argv[3], "rb").read())
else:
    reducer = adasum.Adasum()
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
grads = [torch.randn(4, 2), torch.randn(2)]
reducer.all_reduce(grads)
print(f"other threads after the step: {other_threads()}", flush=True)
if sys.argv[2] == "destroy":
    dist.destroy_process_group()
if sys.argv[2] == "sys.exit":
    sys.exit(0)  # SystemExit is not an uncaught exception: the hook runs
if sys.argv[2] == "fail":
    import time
    time.sleep(0.5)  # past the race at exit, which this test is not about
    raise RuntimeError("the job failed")
if sys.argv[1] == "without":
    import adasum._exit
    atexit.unregister(adasum._exit._destroy_groups)
"""


def _run(tmp_path: Path, hook: str, script_end: str) -> list[str]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    (tmp_path / "reducer.pickle").write_bytes(pickle.dumps(Adasum()))
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        args = [sys.executable, str(script), hook, script_end, str(tmp_path / "reducer.pickle")]
        procs.append(subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == (1 if script_end == "fail" else 0), err
        outs.append(out)
    return outs


@pytest.mark.parametrize("script_end", ["keep", "destroy", "sys.exit"])
def test_the_groups_threads_are_joined_before_the_interpreter_shuts_down(
    tmp_path: Path, script_end: str
) -> None:
    for out in _run(tmp_path, "with", script_end):
        assert "other threads after the step: 0" not in out  # the group was up and working
        assert "other threads at exit: 0" in out, out


def test_an_unpickled_reducer_arranges_the_same(tmp_path: Path) -> None:
    for out in _run(tmp_path, "unpickled", "keep"):
        assert "other threads at exit: 0" in out, out


def test_without_the_hook_the_threads_outlive_the_scripts_destroy(tmp_path: Path) -> None:
    # The control: the check above can fail, and does where adasum does nothing, even after
    # the script's own destroy_process_group (torch's frozen default keeps the group).
    for out in _run(tmp_path, "without", "destroy"):
        assert "other threads at exit: 0" not in out, out


def test_a_failed_job_ends_without_the_hook(tmp_path: Path) -> None:
    # An uncaught exception: the groups are left as they are (their destructor could wait for a
    # dead peer's collectives), the threads still there.
    for out in _run(tmp_path, "with", "fail"):
        assert "other threads at exit: 0" not in out, out
