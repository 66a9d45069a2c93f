"""The simulator's parts: reducing stacked workers, the sequential-SGD distance, delta mode,
the step plan and the task registry."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import adasum
from adasum.lab.config import ConfigError, RunConfig, Steps, make_reducer
from adasum.lab.records import crossing, evaluate
from adasum.lab.replicas import Replicas
from adasum.lab.simulate import reduce_stacked, simulate_run, sweep
from adasum.lab.task import TaskError
from adasum.lab.tasks import load_task


def test_reduce_stacked_matches_the_reducer_and_the_mean():
    """The lab's reducer names give Adasum, the mean and the sum over the stacked workers."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(5, 3, 4, generator=g), torch.randn(5, 7, generator=g)]
    per_rank = [[t[r] for t in layers] for r in range(5)]
    for got, want in zip(reduce_stacked(layers, make_reducer("adasum")), adasum.reduce(per_rank)):
        assert torch.equal(got, want)
    assert torch.allclose(reduce_stacked(layers, make_reducer("average"))[1], sum(r[1] for r in per_rank) / 5)
    assert torch.allclose(reduce_stacked(layers, make_reducer("sum"))[0], sum(r[0] for r in per_rank))


def test_one_worker_update_is_sequential_sgd():
    """With one worker, sequential SGD is one SGD step: every reducer is at distance 0."""
    task = load_task("digits-mlp")
    history, summary = simulate_run(task, RunConfig(optimizer="sgd", epochs=1, batch=64), 1)
    for key in ("dist_adasum", "dist_average", "dist_sum"):
        assert summary[key] < 1e-5, summary
    assert summary["adasum_scale"] == pytest.approx(1.0)


def test_adasum_is_closer_to_sequential_sgd_than_average_with_many_workers():
    task = load_task("digits-mlp")
    _, summary = simulate_run(task, RunConfig(optimizer="sgd", lr=0.1, epochs=1, batch=8), 32)
    assert summary["dist_adasum"] < summary["dist_average"]
    assert 1.0 < summary["adasum_scale"] < 32.0


def test_delta_mode_with_one_worker_is_the_plain_optimizer():
    task = load_task("logistic", samples=512)
    config = RunConfig(task="logistic", samples=512, optimizer="adam", lr=0.01, epochs=1, batch=64)
    history, _ = simulate_run(task, config, 1, distances=False)
    model = task.build_model(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    plan = Steps(config, 1, len(task.x_train))
    for (_, idx), row in zip(plan.batches(), history):
        opt.zero_grad()
        loss = task.loss(model(task.x_train[idx]), task.y_train[idx])
        loss.backward()
        opt.step()
        assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_delta_mode_momentum_with_one_worker_is_gradient_mode():
    """One worker's own momentum step is the step on the reduced gradient: the two modes differ
    only in what more workers reduce."""
    task = load_task("logistic", samples=512)
    config = RunConfig(task="logistic", samples=512, optimizer="momentum", reducer="adasum",
                       lr=0.05, epochs=1, batch=32)
    modes = {m: simulate_run(task, config.with_(mode=m), 1, distances=False)[0] for m in ("gradient", "delta")}
    for g, d in zip(modes["gradient"], modes["delta"], strict=True):
        assert d["loss"] == pytest.approx(g["loss"], rel=1e-6)
    # With four workers Adasum's modes part: each worker's momentum follows its own gradients,
    # and Adasum of the momenta is not the momentum of Adasum (averaging would be: it is linear).
    four = {m: simulate_run(task, config.with_(mode=m), 4, distances=False)[0] for m in ("gradient", "delta")}
    assert max(abs(g["loss"] - d["loss"]) for g, d in zip(four["gradient"], four["delta"])) > 1e-4


def test_mode_must_be_gradient_or_delta():
    with pytest.raises(ConfigError, match="unknown mode"):
        RunConfig(mode="deltas").validated()
    assert RunConfig(optimizer="adam").reduces_deltas and not RunConfig(optimizer="adam", mode="gradient").reduces_deltas
    assert RunConfig(optimizer="momentum", mode="delta").reduces_deltas and not RunConfig().reduces_deltas


def test_sum_diverges_where_adasum_does_not():
    task = load_task("digits-mlp")
    runs = {c: simulate_run(task, RunConfig(reducer=c, lr=0.5, epochs=2, batch=8), 32, distances=False)[1]
            for c in ("adasum", "sum")}
    assert runs["sum"]["diverged"] or runs["sum"]["score"] < 0.5
    assert not runs["adasum"]["diverged"]


def test_steps_to_target_is_the_first_of_two_evaluations_at_the_target():
    task = load_task("digits-mlp")
    config = RunConfig(epochs=3, batch=16, target=0.8)
    history, summary = simulate_run(task, config, 4, distances=False)
    scored = [r for r in history if "score" in r]
    first = next(r for r, s in zip(scored, scored[1:]) if r["score"] >= 0.8 and s["score"] >= 0.8)
    assert summary["steps_to_target"] == first["step"]
    assert summary["epochs_to_target"] == pytest.approx(first["step"] * 64 / len(task.x_train))


def test_sum_at_lr_is_average_at_workers_times_lr():
    """Why the study sweeps no sum: in gradient mode the sum of N gradients at lr is their
    average at N x lr, step for step (the SGD and momentum updates are linear in lr x gradient)."""
    task = load_task("logistic", samples=512)
    config = RunConfig(task="logistic", samples=512, optimizer="momentum", lr=0.01, epochs=1, batch=16,
                       warmup=3, schedule="cosine")
    summed, _ = simulate_run(task, config.with_(reducer="sum"), 4, distances=False)
    averaged, _ = simulate_run(task, config.with_(reducer="average", lr=0.04), 4, distances=False)
    adasum_, _ = simulate_run(task, config.with_(reducer="adasum", lr=0.04), 4, distances=False)
    for s, a in zip(summed, averaged, strict=True):
        assert s["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max(abs(s["loss"] - a["loss"]) for s, a in zip(summed, adasum_)) > 1e-3


def test_one_evaluation_at_the_target_is_no_crossing():
    rows = [{"step": s, "score": v} for s, v in enumerate([0.5, 0.81, 0.7, 0.82, 0.85, 0.9], start=1)]
    assert crossing(rows, 0.8) == 4  # step 2 touched the target and fell back
    assert crossing(rows[:4], 0.8) is None  # the last evaluation alone is not enough
    assert crossing(rows, 0.95) is None


def test_sweep_skips_settings_larger_than_the_training_set():
    task = load_task("linear", samples=256)
    base = RunConfig(task="linear", samples=256, epochs=1, target=0.5, lr=0.05)
    summaries, curves = sweep(task, base, workers=[2, 64], reducers=["adasum"], optimizers=["sgd"],
                              lrs=[0.05], batches=[8], accums=[1, 4], distances=False)
    assert [(s["workers"], s["accum"]) for s in summaries] == [(2, 1), (2, 4)]
    assert {r["run"] for r in curves} == {0, 1}


def test_plan_orders_examples_by_seed_and_epoch():
    plan = Steps(RunConfig(batch=10, epochs=2, seed=3), 4, 1000)
    steps = list(plan.batches())
    assert len(steps) == plan.total_steps == 2 * 25
    first_epoch = torch.cat([idx for _, idx in steps[:25]])
    assert len(set(first_epoch.tolist())) == 1000
    assert [s for s, _ in plan.batches(start=30)] == list(range(30, 50))
    assert not torch.equal(steps[0][1], Steps(RunConfig(batch=10, seed=4), 4, 1000).epoch_order(0)[0])
    with pytest.raises(ConfigError, match="training set"):
        Steps(RunConfig(batch=300), 4, 1000)


def test_evaluations_per_doubling_add_geometric_points():
    plan = Steps(RunConfig(batch=10, epochs=4, evals_per_epoch=1, evals_per_doubling=8), 1, 1000)
    steps = {s for s in range(1, plan.total_steps + 1) if plan.evaluates_after(s)}
    # The first step at or after each 2^(j/8), and the end of every epoch.
    geometric = {math.ceil(2 ** (j / 8)) for j in range(8 * 9)} & set(range(1, 401))
    assert steps == geometric | {100, 200, 300, 400}
    assert sorted(steps)[:20] == [*range(1, 17), 18, 20, 21, 23]  # every step while 2^(1/8) x < x + 1
    assert len([s for s in steps if 200 < s <= 400]) == 8 + 2  # a doubling's 8, and 2 epochs' ends
    plain = Steps(RunConfig(batch=10, epochs=4, evals_per_epoch=1), 1, 1000)
    assert [s for s in range(1, 401) if plain.evaluates_after(s)] == [100, 200, 300, 400]
    with pytest.raises(ConfigError, match="per doubling"):
        RunConfig(evals_per_doubling=-1).validated()


def test_lr_schedules():
    plan = Steps(RunConfig(lr=1.0, batch=10, epochs=1, warmup=2, schedule="cosine"), 1, 100)
    lrs = [plan.lr_at(s) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[-1] < 0.05
    assert Steps(RunConfig(lr=1.0, batch=10, epochs=1, schedule="linear"), 1, 100).lr_at(5) == 0.5


def test_file_tasks(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", x=rng.standard_normal((50, 3)), y=rng.standard_normal(50))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((50, 3)), y=rng.integers(0, 3, 50),
             x_test=rng.standard_normal((7, 3)), y_test=rng.integers(0, 3, 7))
    reg, cls = load_task("file", str(tmp_path / "r.npz")), load_task("file", str(tmp_path / "c.npz"))
    assert (reg.kind, reg.model, len(reg.x_test)) == ("regression", "linear", 10)
    assert (cls.kind, cls.model, len(cls.x_test), cls.outputs) == ("classification", "mlp", 7, 3)
    with pytest.raises(TaskError, match="only for task 'file'"):
        load_task("digits-mlp", str(tmp_path / "r.npz"))


def test_regression_score_is_r2():
    task = load_task("linear", samples=1024)
    perfect = task.score(task.y_test.unsqueeze(-1), task.y_test)
    constant = task.score(torch.full((len(task.y_test), 1), task.y_test.mean().item()), task.y_test)
    assert perfect == 1.0 and math.isclose(constant, 0.0, abs_tol=1e-6)


def test_cnn_task_trains_under_vmap():
    task = load_task("digits-cnn")
    _, summary = simulate_run(task, RunConfig(task="digits-cnn", epochs=1, batch=16, lr=0.05), 4)
    assert summary["train_loss"] < 2.3 and not summary["diverged"]


def test_lr_grid_table_has_a_column_per_learning_rate():
    from adasum.lab.report import lr_grid_table

    base = {"optimizer": "sgd", "reducer": "sum", "workers": 4, "batch": 8, "accum": 1,
            "examples_per_step": 32, "target": 0.9, "score": 0.5, "epochs_to_target": None,
            "diverged": False}
    rows = [{**base, "lr": 0.1, "score": 0.95, "epochs_to_target": 1.5},
            {**base, "lr": 1.0, "diverged": True},
            {**base, "reducer": "adasum", "lr": 1.0}]
    lines = lr_grid_table(rows).splitlines()
    assert lines[0].endswith("| lr 0.1 | lr 1 |")
    assert lines[2] == "| sgd | adasum | 4 | 8 | 1 | 32 |  | - (0.5) |"
    assert lines[3] == "| sgd | sum | 4 | 8 | 1 | 32 | 1.5 (0.95) | div |"


def test_a_run_stopped_at_the_target_is_the_full_run_up_to_its_crossing():
    task = load_task("digits-mlp")
    config = RunConfig(optimizer="momentum", lr=0.05, epochs=4, batch=16, target=0.8, seed=2)
    full, full_summary = simulate_run(task, config, 4, distances=False)
    stopped, summary = simulate_run(task, config, 4, distances=False, stop_at_target=True)
    reached = full_summary["steps_to_target"]
    assert reached is not None and summary["steps_to_target"] == reached
    evaluated = [r["step"] for r in full if "score" in r]
    # It ends at the second of the two evaluations that make the crossing, the same steps.
    assert stopped[-1]["step"] == evaluated[evaluated.index(reached) + 1] < len(full)
    assert [r["loss"] for r in stopped] == [r["loss"] for r in full[: len(stopped)]]
    assert summary["score"] >= config.target


# ----------------------------------------------------------------------------- local SGD

def _diloco(**changes) -> RunConfig:
    """3 workers of 16 examples on 512: 10 steps an epoch, so with H = 3 the epoch ends one
    step into a cycle."""
    return RunConfig(task="logistic", samples=512, optimizer="adam", lr=0.01, epochs=2, batch=16,
                     evals_per_epoch=2, sync_every=3, outer="nesterov", **changes)


@pytest.mark.parametrize("chunk", [None, 2])
def test_local_sgd_equals_a_replay_of_the_workers(chunk):
    """Every worker its own Adam on its own weights, Adasum of the deltas from the shared
    weights every third step, DiLoCo's Nesterov step on the shared weights; the workers'
    gradients in one call or in chunks of 2."""
    task = load_task("logistic", samples=512)
    config = _diloco()
    history, summary = simulate_run(task, config, 3, distances=False, worker_chunk=chunk)
    plan = Steps(config, 3, task.train_size)
    shared = task.build_model(config.seed)
    workers = [copy.deepcopy(shared) for _ in range(3)]
    inner = [torch.optim.Adam(w.parameters(), lr=0.01) for w in workers]
    outer = torch.optim.SGD(shared.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for (step, idx), row in zip(plan.batches(), history, strict=True):
        x, y = task.examples(idx.view(3, plan.per_worker))
        losses = []
        for r, (w, opt) in enumerate(zip(workers, inner)):
            opt.zero_grad()
            loss = task.loss(w(x[r]), y[r])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert row["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5), step
        if (step + 1) % 3 == 0:
            deltas = [[a.detach() - b.detach() for a, b in zip(w.parameters(), shared.parameters())] for w in workers]
            for p, d in zip(shared.parameters(), adasum.reduce(deltas)):
                p.grad = -d
            outer.step()
            for w in workers:
                w.load_state_dict(shared.state_dict())
    assert history[-1]["score"] == pytest.approx(evaluate(task, shared)["score"], abs=1e-6)
    assert (summary["sync_every"], summary["outer"], summary["outer_lr"]) == (3, "nesterov", 0.7)
    assert math.isnan(summary["dist_adasum"]) and math.isnan(summary["noise_scale"])


def test_local_sgd_resumes_in_the_middle_of_a_cycle():
    task = load_task("logistic", samples=512)
    checkpoints = []
    full, _ = simulate_run(task, _diloco(), 3, distances=False, on_epoch=checkpoints.append)
    assert checkpoints[0]["since_sync"] == 1
    resumed, _ = simulate_run(task, _diloco(), 3, distances=False, resume=checkpoints[0])
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[10:]]
    assert resumed[-1]["score"] == full[-1]["score"]


def test_local_sgd_options():
    defaults = RunConfig().as_dict()
    # Stored runs (and the study's file names) keep the configuration they had.
    assert not {"sync_every", "outer", "outer_lr"} & set(defaults)
    assert RunConfig(**defaults) == RunConfig()
    local = RunConfig(optimizer="adam", sync_every=4)
    assert local.as_dict()["sync_every"] == 4 and RunConfig(**local.as_dict()) == local
    assert local.validated().local and not RunConfig(optimizer="adam").local
    with pytest.raises(ConfigError, match="need delta mode"):
        RunConfig(optimizer="momentum", sync_every=4).validated()
    with pytest.raises(ConfigError, match="unknown outer optimizer"):
        RunConfig(optimizer="adam", outer="adam").validated()
    with pytest.raises(ConfigError, match="--sync-every must be at least 1"):
        RunConfig(optimizer="adam", sync_every=0).validated()


def test_a_grown_delta_run_gives_every_worker_moments_of_its_own():
    """Growing from 2 workers to 4, workers 2 and 3 start from copies of workers 0's and 1's
    Adam state (r mod N): copies, not the same tensors, which both would update in place."""
    model = torch.nn.Linear(3, 2)
    replicas = Replicas(model, RunConfig(optimizer="adam", lr=0.01))
    replicas.resize(2)
    replicas.step([torch.randn(2, *p.shape) for p in model.parameters()], make_reducer("adasum"))
    replicas.resize(4)
    moments = [opt.state[opt.param_groups[0]["params"][0]]["exp_avg"] for opt in replicas.optimizers]
    assert torch.equal(moments[2], moments[0]) and torch.equal(moments[3], moments[1])
    assert len({m.data_ptr() for m in moments}) == 4
