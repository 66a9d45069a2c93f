"""``adasum train`` against ``adasum simulate``, resuming from a checkpoint, and what the
program does when a checkpoint is damaged, when the user presses Ctrl-C and when a worker dies."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adasum.lab.cli import main
from adasum.lab.config import RunConfig
from adasum.lab.simulate import simulate_run
from adasum.lab.tasks import load_task
from adasum.lab.train import check_resume, load_checkpoint, save_checkpoint


def losses(path: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(path))]


def train(args: list[str], out: Path) -> list[float]:
    assert main(["train", *args, "--out", str(out), "--no-progress"]) == 0
    return losses(out / "history.csv")


def simulated(workers: int, **options) -> list[float]:
    config = RunConfig(**options)
    history, _ = simulate_run(load_task(config.task, config.data, config.samples), config, workers,
                              distances=False)
    return [r["loss"] for r in history]


def assert_same_curve(real: list[float], sim: list[float]) -> None:
    assert len(real) == len(sim) > 0
    for step, (a, b) in enumerate(zip(real, sim), start=1):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (step, a, b)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("reducer, lr, other", [
    ("adasum", 0.05, "average"),
    # The baselines take the same hook as Adasum; the sum at a quarter of the learning rate,
    # where four workers' summed gradients do not diverge.
    ("average", 0.05, "adasum"),
    ("sum", 0.0125, "adasum"),
])
def test_torchrun_four_workers_follow_the_simulator(reducer, lr, other, tmp_path):
    """The issue's check: 4 real processes under torchrun, momentum SGD, each reducer."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node=4", "-m", "adasum.lab.cli", "train",
           "--epochs", "2", "--batch", "16", f"--reducer={reducer}", f"--lr={lr}",
           "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sim = simulated(4, epochs=2, batch=16, reducer=reducer, optimizer="momentum", lr=lr)
    assert_same_curve(losses(tmp_path / "history.csv"), sim)
    # The simulator is not trivially close to anything: another reducer gives another curve.
    other_curve = simulated(4, epochs=2, batch=16, reducer=other, optimizer="momentum", lr=lr)
    assert max(abs(a - b) for a, b in zip(sim, other_curve)) > 1e-2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("options", [
    # delta mode through DistributedOptimizer, every reducer: accumulation, three workers (not
    # a power of two)
    {"workers": 3, "optimizer": "adam", "reducer": "adasum", "lr": 0.003, "batch": 8, "accum": 2},
    {"workers": 2, "optimizer": "lamb", "reducer": "sum", "lr": 0.01, "batch": 16, "accum": 1},
    {"workers": 3, "optimizer": "adam", "reducer": "average", "lr": 0.003, "batch": 8, "accum": 2},
    # gradient mode through DDP and adasum_hook, every reducer (Adasum on three ranks with
    # accumulation under no_sync)
    {"workers": 3, "optimizer": "momentum", "reducer": "adasum", "lr": 0.05, "batch": 8, "accum": 2},
    {"workers": 2, "optimizer": "sgd", "reducer": "sum", "lr": 0.02, "batch": 16, "accum": 2},
    {"workers": 3, "optimizer": "momentum", "reducer": "average", "lr": 0.1, "batch": 16, "accum": 1},
    # the other mode of each optimizer: Adam on the reduced gradient (prior work's baseline,
    # through DDP), momentum's own updates reduced (Horovod's delta mode, DistributedOptimizer)
    {"workers": 3, "optimizer": "adam", "mode": "gradient", "reducer": "adasum", "lr": 0.003, "batch": 8, "accum": 2},
    {"workers": 2, "optimizer": "momentum", "mode": "delta", "reducer": "adasum", "lr": 0.05, "batch": 16, "accum": 1},
    # the tasks of the paper's kind: the transformer in delta mode, the residual CNN in gradient mode
    {"workers": 2, "task": "stdlib-transformer", "samples": 24, "optimizer": "lamb", "reducer": "adasum",
     "lr": 0.01, "batch": 2, "accum": 2, "evals_per_epoch": 1},
    {"workers": 3, "task": "augdigits-resnet", "samples": 96, "optimizer": "momentum", "reducer": "adasum",
     "lr": 0.05, "batch": 8, "accum": 2, "evals_per_epoch": 1},
])
def test_spawned_workers_follow_the_simulator(options, tmp_path):
    o = dict(options)
    n = o.pop("workers")
    real = train(["--nproc", str(n), "--epochs", "1", *(f"--{k.replace('_', '-')}={v}" for k, v in o.items())], tmp_path)
    assert_same_curve(real, simulated(n, epochs=1, **o))


@pytest.mark.timeout(240)
def test_resume_continues_the_same_run(tmp_path, capsys):
    """One epoch, then resume to two, equals two epochs in one go (delta mode: every rank's own
    Adam moments must come back)."""
    args = ["--nproc", "2", "--optimizer", "adam", "--lr", "0.003", "--batch", "32"]
    straight = train([*args, "--epochs", "2"], tmp_path / "straight")
    first = train([*args, "--epochs", "1"], tmp_path / "split")
    checkpoint = tmp_path / "split" / "checkpoint.pt"
    resumed = train([*args, "--epochs", "2", "--resume", str(checkpoint)], tmp_path / "split")
    assert len(first) * 2 == len(straight) == len(resumed)
    assert resumed[:len(first)] == first
    assert_same_curve(resumed, straight)
    capsys.readouterr()
    # A checkpoint only continues the run it came from.
    assert main(["train", *args, "--epochs", "2", "--lr", "0.01", "--resume", str(checkpoint)]) == 2
    assert main(["train", *args, "--epochs", "1", "--resume", str(checkpoint)]) == 2
    # (Another number of workers may resume it: tests/test_train_resize.py.)
    err = capsys.readouterr().err.splitlines()
    assert err == ["adasum: error: checkpoint was written with --lr 0.003 (this run: 0.01); only --epochs may grow",
                   "adasum: error: checkpoint was written with --epochs 2 (this run: 1); --epochs may grow, not shrink"]


@pytest.mark.timeout(300)
def test_local_sgd_workers_follow_the_simulator_and_resume_mid_cycle(tmp_path):
    """DiLoCo through LocalSGD (Adam inside, Nesterov outside, a synchronisation every 5 steps,
    which an epoch does not divide): the losses, the test losses of the synchronised weights and
    the statistics of the reduced deltas are the simulator's; a run resumed from the checkpoint
    of the first epoch, in the middle of a cycle, continues it."""
    args = ["--nproc", "2", "--optimizer", "adam", "--lr", "0.003", "--batch", "16", "--sync-every", "5",
            "--outer-optimizer", "nesterov", "--outer-lr", "0.7"]
    straight = train([*args, "--epochs", "2"], tmp_path / "straight")
    config = RunConfig(optimizer="adam", lr=0.003, batch=16, epochs=2, sync_every=5, outer="nesterov", outer_lr=0.7)
    history, _ = simulate_run(load_task(config.task), config, 2, distances=False, diagnostics=True)
    assert_same_curve(straight, [r["loss"] for r in history])
    rows = list(csv.DictReader(open(tmp_path / "straight" / "history.csv")))
    evaluated = [(float(r["test_loss"]), s["test_loss"]) for r, s in zip(rows, history) if r["test_loss"]]
    assert len(evaluated) > 2 and all(abs(a - b) <= 1e-5 * b for a, b in evaluated)
    # Every synchronisation's row, and only those, carries the deltas' statistics per layer;
    # where the simulator evaluated after one, its statistics of the same deltas agree.
    synced = [r for r in rows if r.get("orth/scale")]
    assert [int(r["step"]) for r in synced] == list(range(5, len(rows) + 1, 5))
    both = [(r, history[int(r["step"]) - 1]) for r in synced if "orth/scale" in history[int(r["step"]) - 1]]
    assert both
    for real, sim in both:
        for key in ("orth/scale", "orth/cos", "orth/layer/0.weight/scale", "orth/layer/2.bias/cos"):
            assert abs(float(real[key]) - sim[key]) <= 1e-5, (real["step"], key)
    first = train([*args, "--epochs", "1"], tmp_path / "split")
    assert len(first) % 5  # the checkpoint falls in the middle of a cycle
    resumed = train([*args, "--epochs", "2", "--resume", str(tmp_path / "split" / "checkpoint.pt")], tmp_path / "split")
    assert resumed[:len(first)] == first
    assert_same_curve(resumed, straight)


# ------------------------------------------------------------------------ damaged checkpoints

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[list[str], Path]:
    """The options of one epoch of a tiny run on a data file, and the checkpoint it wrote."""
    root = tmp_path_factory.mktemp("checkpointed")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.standard_normal((64, 3)), y=rng.integers(0, 2, 64))
    args = ["--task", "file", "--data", str(root / "data.npz"), "--nproc", "1", "--batch", "8"]
    train([*args, "--epochs", "1"], root / "run")
    return args, root / "run" / "checkpoint.pt"


def _flip_a_byte(good: Path, bad: Path) -> None:
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the saved state, which fills most of the file
    bad.write_bytes(bytes(data))


def _rewritten(change):
    """A checkpoint with a valid checksum whose state ``change`` has altered."""
    def make(good: Path, bad: Path) -> None:
        state = load_checkpoint(good)
        change(state)
        save_checkpoint(state, bad)
    return make


def _wrong_shape(state: dict) -> None:
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(7, 7)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage, message", [
    (_flip_a_byte, "checkpoint {path!r} is corrupted: its checksum does not match its contents"),
    (lambda good, bad: bad.write_bytes(good.read_bytes()[:1000]),
     "cannot read checkpoint {path!r} (damaged, or not a checkpoint): "),
    (lambda good, bad: torch.save({"config": {}, "step": 3}, bad),
     "checkpoint {path!r} is not an adasum checkpoint (or predates checksums)"),
    (_rewritten(lambda s: s.pop("optimizers")), "checkpoint {path!r} lacks optimizers"),
    (_rewritten(lambda s: s.update(history=[])),
     "checkpoint {path!r} is inconsistent: 1 optimizer states, 0 history rows for step 6"),
    (_rewritten(lambda s: s["config"].update(colour="red")),
     "checkpoint {path!r} holds options this version does not know"),
    (_rewritten(_wrong_shape), "checkpoint {path!r} does not fit the model: '0.weight' has shape (7, 7) there"),
])
def test_a_bad_checkpoint_is_one_line_before_any_worker_starts(damage, message, checkpointed, tmp_path,
                                                               capsys, monkeypatch):
    args, good = checkpointed
    bad = tmp_path / "checkpoint.pt"
    damage(good, bad)
    monkeypatch.setattr("adasum.launch.spawn", lambda *a, **k: pytest.fail("a worker started"))
    capsys.readouterr()
    assert main(["train", *args, "--epochs", "2", "--resume", str(bad), "--out", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("adasum: error: " + message.format(path=str(bad))), line


def test_the_checkpoint_is_whole_and_nothing_is_left_beside_it(checkpointed):
    args, good = checkpointed
    config = RunConfig(task="file", data=args[3], batch=8, epochs=1)
    task = load_task("file", args[3])
    state = check_resume(good, config, task.build_model(0))
    assert state["step"] == len(task.x_train) // 8 == len(state["history"])
    assert sorted(p.name for p in good.parent.iterdir()) == ["checkpoint.pt", "history.csv", "history.json"]


# ------------------------------------------------------------------- Ctrl-C and a dead worker

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_names_the_checkpoint_it_resumed_from_or_none(checkpointed, tmp_path, capsys, monkeypatch):
    """Before a run saves anything, the checkpoint to go back to is the one it resumed from."""
    args, good = checkpointed
    monkeypatch.setattr("adasum.launch.spawn", _interrupt)
    capsys.readouterr()
    assert main(["train", *args, "--epochs", "2", "--out", str(tmp_path)]) == 130
    assert main(["train", *args, "--epochs", "2", "--out", str(tmp_path), "--resume", str(good)]) == 130
    assert capsys.readouterr().err.splitlines() == ["adasum: interrupted; no checkpoint yet",
                                                    f"adasum: interrupted; last checkpoint: {good}"]


#: A run that saves a checkpoint every 32 steps and would go on for an hour. The learning rate
#: is one it never diverges at: at 0.05 the loss overflows after about 800 steps and the run
#: ends by itself (status 0), which a test slowed down by a busy machine would see instead.
ENDLESS = ["--task", "linear", "--samples", "256", "--batch", "8", "--epochs", "100000", "--lr", "0.005",
           "--no-progress"]
SECONDS = 90  # the longest any wait below may take


@pytest.mark.timeout(120)
def test_a_timeout_under_a_second_is_named_as_given(tmp_path, capsys):
    assert main(["train", "--nproc", "1", "--timeout", "0.5", "--out", str(tmp_path), *ENDLESS]) == 1
    assert capsys.readouterr().err == "adasum: error: workers [0] did not finish within 0.5 s\n"


#: ``python -m adasum.lab`` with SIGINT handled as Python handles it when started from a terminal.
#: A test run started in the background of a script inherits SIGINT ignored (POSIX shells ignore
#: it in asynchronous commands), which the program would rightly keep; resetting it here rather
#: than in a preexec_fn spares the fork of a multithreaded process.
_AS_FROM_A_TERMINAL = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "runpy.run_module('adasum.lab', run_name='__main__', alter_sys=True)")


def _start(nproc: int, out: Path) -> subprocess.Popen:
    """``adasum train`` in a session of its own: the test signals it as a terminal would the
    foreground process group (Ctrl-C reaches the program and its workers alike)."""
    return subprocess.Popen([sys.executable, "-c", _AS_FROM_A_TERMINAL, "train", "--nproc", str(nproc),
                             "--out", str(out), *ENDLESS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_checkpoint(proc: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + SECONDS
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"no checkpoint within {SECONDS} s"
        time.sleep(0.05)


def _workers_of(pid: int) -> list[int]:
    """The worker processes of process ``pid`` in the order they started, which is rank order
    (read from /proc: ppid is field 4 of /proc/PID/stat, the start time field 22). Spawned
    workers are its children; forked from a forkserver (adasum.launch's default on Linux),
    they are the children of its forkserver child."""
    procs = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        procs.append((int(entry), int(fields[1]), int(fields[19]), cmdline))
    servers = {p for p, ppid, _, cmd in procs if ppid == pid and b"forkserver" in cmd}
    found = [(start, p) for p, ppid, start, cmd in procs
             if (ppid == pid and b"spawn_main" in cmd) or ppid in servers]
    return [p for _, p in sorted(found)]


def _ended(proc: subprocess.Popen) -> tuple[str, str]:
    """The program's stdout and stderr once it has ended; a failure saying where the program
    and its workers stand (state and kernel wait channel) if it does not end in time."""
    try:
        return proc.communicate(timeout=SECONDS)
    except subprocess.TimeoutExpired:
        where = []
        for pid in [proc.pid, *_workers_of(proc.pid)]:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                where.append(f"{pid}: {state} in {Path(f'/proc/{pid}/wchan').read_text() or '-'}")
        pytest.fail(f"the program did not end within {SECONDS} s: {'; '.join(where)}")


def _assert_loadable(path: Path, workers: int) -> None:
    config = RunConfig(task="linear", samples=256, batch=8, epochs=100000, lr=0.005)  # as ENDLESS
    assert check_resume(path, config, load_task("linear", samples=256).build_model(0))["workers"] == workers


@pytest.fixture
def program():
    """Started programs, whose process groups are killed if a test fails before they end."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=SECONDS)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nproc", [2, 1])
def test_ctrl_c_is_one_line_status_130_and_the_checkpoint_stays(nproc, tmp_path, program):
    checkpoint = tmp_path / "checkpoint.pt"
    proc = _start(nproc, tmp_path)
    program.append(proc)
    _wait_for_checkpoint(proc, checkpoint)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = _ended(proc)
    assert (proc.returncode, err) == (130, f"adasum: interrupted; last checkpoint: {checkpoint}\n"), out
    _assert_loadable(checkpoint, nproc)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers in /proc")
@pytest.mark.timeout(180)
def test_a_killed_worker_is_one_line_naming_its_rank_and_signal(tmp_path, program):
    checkpoint = tmp_path / "checkpoint.pt"
    proc = _start(2, tmp_path)
    program.append(proc)
    _wait_for_checkpoint(proc, checkpoint)
    workers = _workers_of(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = _ended(proc)
    assert (proc.returncode, err) == (1, "adasum: error: worker 1 was killed by signal 9 (SIGKILL)\n"), out
    _assert_loadable(checkpoint, 2)


def _checkpoint_replicas(rank: int, world: int, out: str, ulp_on: int | None) -> str:
    """Every rank offers the same small model for a checkpoint, except that rank ``ulp_on``
    moves one weight by one unit in the last place: what the rank reports."""
    from adasum.lab.resume import plan_run
    from adasum.lab.train import _checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    if rank == ulp_on:
        with torch.no_grad():
            model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(1.0))
    config = RunConfig(task="linear", samples=64, batch=8, epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        _checkpoint(Path(out), rank, config, plan_run(config, world, 64), model, optimizer, 3, [])
    except RuntimeError as e:
        return str(e)
    return "written"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ulp_on", [None, 0, 2])
def test_a_checkpoint_of_replicas_that_differ_by_one_bit_is_refused_on_every_rank(ulp_on, tmp_path):
    from adasum.launch import spawn
    from conftest import TIMEOUT

    reports = spawn(_checkpoint_replicas, 3, str(tmp_path), ulp_on, timeout=TIMEOUT)
    if ulp_on is None:
        assert reports == ["written"] * 3
        assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
        return
    assert all(r.startswith("adasum train: the replicas differ after step 3 (digests ") for r in reports), reports
    assert len(set(reports)) == 1  # every rank names the same digests
    assert not (tmp_path / "checkpoint.pt").exists()
