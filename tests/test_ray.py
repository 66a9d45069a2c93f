"""Adasum under Ray Train: ``TorchTrainer`` on a local Ray cluster of 2 CPU workers, the hook on
the model ``ray.train.torch.prepare_model`` returns (``adasum.ddp.use_adasum``), and a restart
after a worker dies (``FailureConfig``).

The workers train a small MLP for a few steps, reporting a checkpoint after every step, in
gradient mode (SGD; rank 0's parameters are the checkpoint) and in delta mode
(``DistributedOptimizer(Adam)``; every rank adds its own optimizer state, and Ray merges the
ranks' files into one checkpoint). At the first attempt's step FAIL_AT rank 1 ends its process
(``os._exit``); Ray Train must start a new worker group, which resumes from the last checkpoint.
Every rank writes, per step, the parameters before and after it, its batch and the gradients the
optimizer saw. Gradient mode: the parent checks each step against ``adasum.reduce`` of the
ranks' local gradients (recomputed on a plain copy of the model) and that the resumed run
started from the checkpointed parameters. Delta mode: the gradients stay local, and every
step's parameters are those of an uninterrupted replay in one process (per-rank Adam, the
deltas combined by ``adasum.reduce``), which a restart that lost a rank's moments would miss.
``pip install 'adasum[ray]'``; skipped without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray.train.torch")

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402

import adasum  # noqa: E402
from adasum.ddp import use_adasum  # noqa: E402
from adasum.optim import DistributedOptimizer, rank_state  # noqa: E402
from conftest import same_bits  # noqa: E402
from stacks import assert_adasum_of_local, local_gradients  # noqa: E402

WORLD = 2
STEPS = 5
FAIL_AT = 3
LR = 0.1
#: Both modes' runs (Ray's start, two attempts each): the first test that uses them waits for them.
RUNS_LIMIT = 600


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def _resume(rank: int) -> tuple[dict | None, dict | None, int]:
    """The last checkpoint's model state, this rank's optimizer state (delta mode: old rank
    ``rank mod N``'s; None in gradient mode) and the step to start at (None, None, 0 on a first
    start)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None, 0
    with checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / "state.pt")
        files = sorted(Path(folder).glob("optimizer-*.pt"), key=lambda f: int(f.stem.split("-")[1]))
        optimizer = rank_state([torch.load(f) for f in files], rank) if files else None
    return saved["model"], optimizer, saved["step"] + 1


def _report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int, delta: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:  # the ranks' parameters are equal: one copy is the checkpoint
            torch.save({"model": model.module.state_dict(), "step": step}, Path(folder) / "state.pt")
        if delta:  # every rank's own moments; Ray merges the ranks' folders into one checkpoint
            torch.save(optimizer.state_dict(), Path(folder) / f"optimizer-{rank}.pt")
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 or delta else None
        ray.train.report({"step": step}, checkpoint=checkpoint)


def _loop(config: dict) -> None:
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    out, delta = Path(config["out"]), config["delta"]
    torch.manual_seed(rank)  # different initialisations: prepare_model's DDP must broadcast rank 0's
    net = _net()
    saved, own, start = _resume(rank)
    if saved is not None:
        net.load_state_dict(saved)
    model = ray.train.torch.prepare_model(net)
    optimizer = (DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=LR)) if delta
                 else torch.optim.SGD(model.parameters(), lr=LR))
    if own is not None:
        optimizer.load_state_dict(own)
    state = use_adasum(model, optimizer)
    for step in range(start, STEPS):
        if step == FAIL_AT and rank == 1 and not (out / "failed").exists():
            (out / "failed").touch()
            os._exit(1)  # a worker that dies: no exception, no clean-up
        batch = _batch(rank, step)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        _loss(model, batch).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        after = [p.detach().clone() for p in model.parameters()]
        torch.save({"before": before, "grads": grads, "batch": batch, "start": start, "after": after},
                   out / f"r{rank}-s{step}-a{start}.pt")
        _report(model, optimizer, step, rank, delta)
    if state is not None:
        state.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ray.train.Result, Path]]:
    """Both modes' runs, on one local Ray cluster."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parent / "src"), str(here)])  # the workers import this module
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    done = {}
    try:
        for mode in ("gradient", "delta"):
            out = tmp_path_factory.mktemp(f"ray-{mode}")
            trainer = ray.train.torch.TorchTrainer(
                _loop, train_loop_config={"out": str(out), "delta": mode == "delta"},
                scaling_config=ray.train.ScalingConfig(num_workers=WORLD, use_gpu=False),
                run_config=ray.train.RunConfig(storage_path=str(out / "storage"), name="adasum",
                                               failure_config=ray.train.FailureConfig(max_failures=1)),
            )
            done[mode] = trainer.fit(), out
    finally:
        ray.shutdown()
    return done


@pytest.fixture
def run(runs: dict[str, tuple[ray.train.Result, Path]]) -> tuple[ray.train.Result, Path]:
    return runs["gradient"]


def _records(out: Path, step: int, start: int) -> list[dict]:
    return [torch.load(out / f"r{rank}-s{step}-a{start}.pt") for rank in range(WORLD)]


def _resumed_at(out: Path) -> int:
    """The step the second attempt started at."""
    starts = {int(f.stem.split("-a")[1]) for f in out.glob("r*-s*-a*.pt")} - {0}
    assert len(starts) == 1, starts
    return starts.pop()


@pytest.mark.timeout(RUNS_LIMIT)
def test_a_dead_worker_restarts_the_group_from_the_last_checkpoint(run):
    result, out = run
    assert result.error is None and result.metrics["step"] == STEPS - 1
    assert (out / "failed").exists()
    start = _resumed_at(out)
    assert 1 <= start <= FAIL_AT  # from a checkpoint, not from scratch
    assert not any(out.glob(f"r*-s{FAIL_AT}-a0.pt"))  # the first attempt never finished FAIL_AT
    last = _records(out, start - 1, 0)[0]
    for r in _records(out, start, start):  # plain SGD: the checkpoint is the parameters after step start - 1
        for got, before, grad in zip(r["before"], last["before"], last["grads"]):
            torch.testing.assert_close(got, before - LR * grad)
    assert all((out / f"r{rank}-s{STEPS - 1}-a{start}.pt").exists() for rank in range(WORLD))


@pytest.mark.timeout(RUNS_LIMIT)
def test_every_steps_gradients_are_adasum_of_local_ones(run):
    out = run[1]
    start = _resumed_at(out)
    steps = [(step, 0) for step in range(FAIL_AT)] + [(step, start) for step in range(start, STEPS)]
    for step, attempt in steps:
        ranks = _records(out, step, attempt)
        assert same_bits(ranks[0]["before"], ranks[1]["before"])  # prepare_model's DDP broadcast rank 0's
        local = [local_gradients(_net(), r["before"], lambda m, r=r: _loss(m, r["batch"])) for r in ranks]
        assert_adasum_of_local([r["grads"] for r in ranks], local)


@pytest.mark.timeout(RUNS_LIMIT)
def test_delta_mode_resumes_every_ranks_moments_and_matches_an_uninterrupted_replay(runs):
    result, out = runs["delta"]
    assert result.error is None and result.metrics["step"] == STEPS - 1 and (out / "failed").exists()
    start = _resumed_at(out)
    assert 1 <= start <= FAIL_AT
    steps = [(step, 0) for step in range(start)] + [(step, start) for step in range(start, STEPS)]
    first = _records(out, 0, 0)
    params = [p.clone() for p in first[0]["before"]]
    copies = [[torch.nn.Parameter(p.clone()) for p in params] for _ in range(WORLD)]
    adams = [torch.optim.Adam(c, lr=LR) for c in copies]
    for step, attempt in steps:
        ranks = _records(out, step, attempt)
        deltas = []
        for r, (rec, copy_, adam) in enumerate(zip(ranks, copies, adams)):
            assert same_bits(rec["before"], ranks[0]["before"])
            torch.testing.assert_close(rec["before"], params)
            own = local_gradients(_net(), params, lambda m, r=r: _loss(m, _batch(r, step)))
            torch.testing.assert_close(rec["grads"], own)  # the no-op hook kept it local
            with torch.no_grad():
                for c, p, g in zip(copy_, params, own):
                    c.copy_(p)
                    c.grad = g
            adam.step()
            deltas.append([c.detach() - p for c, p in zip(copy_, params)])
        params = [p + d for p, d in zip(params, adasum.reduce(deltas))]
        for rec in ranks:
            assert same_bits(rec["after"], ranks[0]["after"])
            torch.testing.assert_close(rec["after"], params)


@pytest.mark.timeout(400)
def test_example_trains_and_checkpoints_every_ranks_optimizer_state(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples"
    done = subprocess.run(
        [sys.executable, "ray_digits.py", "--delta", "--epochs", "2", "--storage", str(tmp_path)], cwd=examples,
        capture_output=True, text=True, timeout=360,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8, done.stdout
    checkpoints = sorted(p for p in (tmp_path / "digits").glob("checkpoint_*") if p.is_dir())  # named by time
    assert len(checkpoints) == 2
    moments = [torch.load(checkpoints[-1] / f"optimizer-{rank}.pt")["state"][0]["exp_avg"] for rank in range(WORLD)]
    assert not same_bits(moments[0], moments[1])  # each rank's own Adam moments
