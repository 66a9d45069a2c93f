"""The critical-batch measurement (``adasum noise``) and McCandlish's fit of steps against E."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from adasum.lab.cli import main
from adasum.lab.config import ConfigError, RunConfig
from adasum.lab.critical import (
    best_median_rates,
    best_rates,
    fit_critical_batch,
    fit_over_seeds,
    measure_noise,
    noise_report,
    one_worker_config,
    read_sweep,
)
from adasum.lab.simulate import simulate_run
from adasum.lab.tasks import load_task


def test_fit_recovers_s_min_and_the_critical_batch_from_noisy_steps():
    """Steps to target at 11 E from B_crit / 32 to 32 B_crit, each off by up to 10% (the spread
    over seeds), give S_min and B_crit within 10%; exact points give them exactly."""
    s_min, b_crit = 150.0, 3000.0
    e = torch.logspace(math.log10(b_crit / 32), math.log10(b_crit * 32), 11, dtype=torch.float64)
    exact = s_min * (1 + b_crit / e)
    fit = fit_critical_batch(e.tolist(), exact.tolist())
    assert fit.s_min == pytest.approx(s_min, rel=1e-9) and fit.b_crit == pytest.approx(b_crit, rel=1e-9)
    assert fit.residual < 1e-9 and fit.e_min == pytest.approx(s_min * b_crit, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        noisy = exact * (1 + 0.1 * (2 * torch.rand(11, generator=g, dtype=torch.float64) - 1))
        fit = fit_critical_batch(e.tolist(), noisy.round().tolist())
        assert fit.s_min == pytest.approx(s_min, rel=0.1) and fit.b_crit == pytest.approx(b_crit, rel=0.1)
        assert 0 < fit.residual < 0.1 and fit.steps(fit.b_crit) == pytest.approx(2 * fit.s_min)


def test_fit_refuses_points_the_model_cannot_describe():
    with pytest.raises(ValueError, match="two or more distinct"):
        fit_critical_batch([1024, 1024], [100, 110])
    with pytest.raises(ValueError, match="do not fall"):
        fit_critical_batch([1024, 2048, 4096], [100, 110, 130])
    with pytest.raises(ValueError, match="never level off"):
        fit_critical_batch([1024, 2048, 4096], [400, 190, 80])  # better than linear scaling
    with pytest.raises(ValueError, match="positive"):
        fit_critical_batch([1024, 2048], [100, 0])


def test_a_sweep_directory_gives_its_best_rates_and_a_fit_over_seeds(tmp_path):
    """A sweep laid out as scripts/critical-sweep.sh writes it, with steps S_min (1 + B_crit / E)
    at the best rate (one seed never reaching the target at the largest E), 1.5x as many at the
    other rates: the best rates are read back, the medians' fit is exact, and the bootstrap
    interval over seeds holds it."""
    s_min, b_crit = 40.0, 2000.0
    best = {1024: 0.032, 4096: 0.064, 16384: 0.128, 65536: 0.128}
    for e, lr_best in best.items():
        exact = round(s_min * (1 + b_crit / e))
        for lr in (lr_best / 2, lr_best, lr_best * 2):
            for seed, steps in ((0, exact), (1, exact + 4), (2, exact - 4)) if lr == lr_best else ((0, exact * 3 // 2),):
                if e == 65536 and seed == 1:
                    steps = None
                folder = tmp_path / (f"E{e}-lr{lr:g}" + (f"-s{seed}" if seed else ""))
                folder.mkdir()
                (folder / "summary.json").write_text(json.dumps(
                    {"examples_per_step": e, "lr": lr, "seed": seed, "steps_to_target": steps, "steps": 512,
                     "noise_scale_at_target": None if steps is None else 1000.0}))
    runs = read_sweep(tmp_path)
    assert len(runs) == 4 * 5 and best_rates(runs) == best
    fit, b_ci, s_ci = fit_over_seeds({e: [r["steps"] for r in runs if r["E"] == e and r["lr"] == lr]
                                      for e, lr in best.items()})
    assert fit.b_crit == pytest.approx(b_crit, rel=0.01) and fit.s_min == pytest.approx(s_min, rel=0.01)
    assert b_ci[0] < fit.b_crit < b_ci[1] and s_ci[0] < fit.s_min < s_ci[1]
    assert b_ci[1] / b_ci[0] < 1.5  # four steps of spread in 40-120 cannot move B_crit by half


def test_one_worker_config_refusals():
    config = RunConfig(optimizer="momentum", batch=1024)
    assert one_worker_config(config, 8) == config.with_(reducer="average", batch=128)
    with pytest.raises(ConfigError, match="delta mode"):
        one_worker_config(config.with_(optimizer="adam"), 8)
    with pytest.raises(ConfigError, match="multiple of --workers 3"):
        one_worker_config(config, 3)
    with pytest.raises(ConfigError, match="at least 2"):
        one_worker_config(config, 1)


@pytest.mark.parametrize("optimizer,mode,lr", [("momentum", None, 0.2), ("adam", "gradient", 0.01)])
def test_averaged_workers_are_one_worker_at_the_whole_batch(optimizer, mode, lr):
    """The premise of the measurement: 4 averaged workers of 64 examples train exactly as one
    worker of 256 (the same examples each step, the mean loss over them), to float rounding;
    and only the measured run has a noise scale. Adam in gradient mode (one Adam on the averaged
    gradient) too."""
    task = load_task("gauss-logistic", samples=4096)
    config = RunConfig(task="gauss-logistic", samples=4096, optimizer=optimizer, mode=mode, lr=lr, batch=256,
                       epochs=1, evals_per_epoch=4)
    measured, summary = measure_noise(task, config, 4)
    alone, _ = simulate_run(task, config.with_(reducer="average"), 1, distances=False)
    assert len(measured) == len(alone) == 16 and summary["examples_per_step"] == 256
    for a, b in zip(measured, alone):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if "score" in a:
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert math.isfinite(a["noise_scale"]) and math.isnan(b["noise_scale"])


def test_noise_command_prints_a_finite_noise_scale_at_the_target(tmp_path, capsys):
    assert main(["noise", "--task", "gauss-logistic", "--samples", "8192", "--optimizer", "sgd", "--lr", "0.5",
                 "--batch", "256", "--workers", "4", "--epochs", "1", "--evals-per-epoch", "8",
                 "--target", "0.5", "--levels", "0.3,0.99", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "gauss-logistic: sgd lr 0.5, batch 256 (4 averaged workers x 64)"
    assert out[1].split() == ["step", "examples", "score", "B_simple"]
    assert [int(line.split()[0]) for line in out[2:10]] == list(range(4, 33, 4))
    assert "score 0.99 not reached" in out and any(line.startswith("score 0.3 first at step ") for line in out)
    reached = next(line for line in out if line.startswith("target 0.5 first reached"))
    assert math.isfinite(float(reached.rsplit("B_simple ", 1)[1])) and float(reached.rsplit(" ", 1)[1]) > 0
    assert out[-1].startswith("steps to target: ") and "at E = 256" in out[-1]
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "summary.json").is_file()


def test_noise_report_without_a_target_says_none_was_set():
    history = [{"step": 4, "loss": 0.5, "score": 0.8, "noise_scale": 100.0}]
    summary = {"task": "digits-mlp", "optimizer": "sgd", "lr": 0.1, "examples_per_step": 64, "workers": 4,
               "batch": 16, "accum": 1, "target": None, "steps_to_target": None, "steps": 4,
               "seconds": 1.0, "seconds_per_step": 0.25}
    lines = noise_report(history, summary)
    assert "no --target given: B_simple at the target not measured" in lines
    assert lines[-1].startswith("steps to target: no target set at E = 64;")
    assert noise_report(history, {**summary, "target": 0.9})[-1].startswith("steps to target: not reached")


def test_noise_command_refuses_delta_mode(capsys):
    assert main(["noise", "--task", "gauss-logistic", "--samples", "1024", "--optimizer", "adam"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "adasum: error: adam runs in delta mode here, where averaging the workers' updates is not one "
        "worker's step: measure in gradient mode (--mode gradient)"]


def test_the_committed_gpu_sweeps_give_the_critical_batches_the_docs_quote(monkeypatch, capsys):
    """scripts/critical-fit.py on the H200 sweeps in docs/results/critical_gpu prints the fits
    that docs/results/critical_batch.md and the sections' GPU scales quote."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr("sys.argv", ["critical-fit.py", *(str(root / "docs/results/critical_gpu" / name)
                                                           for name in ("augdigits", "adam", "lamb"))])
    runpy.run_path(str(root / "scripts/critical-fit.py"), run_name="__main__")
    out = capsys.readouterr().out
    for quoted in ("B_crit 93 [56-141]", "B_crit 2,635 [2,116-3,590]", "B_crit 1,638 [1,399-2,395]"):
        assert quoted in out


def test_the_best_rate_by_median_over_seeds_is_not_the_luckiest_draw():
    """Seed 0 is lucky at the high rate (20 steps) where the others never reach the target; the
    median picks the rate every seed reaches it at. A rate with fewer than 3 seeds is not a
    candidate, and an E whose every candidate's median is infinite has none."""
    runs = [{"E": 64, "lr": 0.2, "seed": s, "steps": st} for s, st in enumerate((20, None, None, 90, None))]
    runs += [{"E": 64, "lr": 0.1, "seed": s, "steps": st} for s, st in enumerate((40, 42, 38, 44, 41))]
    runs += [{"E": 64, "lr": 0.05, "seed": s, "steps": 10} for s in (1, 2)]  # two seeds only
    runs += [{"E": 256, "lr": 0.1, "seed": s, "steps": None} for s in range(3)]
    assert best_rates(runs) == {64: 0.2}
    assert best_median_rates(runs) == {64: 0.1}
