"""``adasum study diloco``: the plan (sweep, widening, seeds at averaging's best rates and at
Adasum's one rate), the three questions' verdicts on made-up runs, and a tiny study run end to
end and resumed (seconds on 2 cores; far below the shipped scales' 5 seeds and 1,024 steps)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from adasum.lab.cli import main
from adasum.lab.config import ConfigError, Steps
from adasum.lab.diloco import (
    LOCAL_SECTIONS,
    READING,
    LocalScale,
    Synced,
    common_rate,
    local_spec,
    next_local_points,
    run_local_study,
)
from adasum.lab.diloco_report import match_rows, one_rate_rows, orthogonality_rows, write_local_report
from adasum.lab.study_plan import Point

SECTION = LOCAL_SECTIONS["diloco"]
TINY = LocalScale(workers=(2, 4), sync_every=(1, 4), batch=16, budget=8, inner_lr=3e-3, lrs=(0.25, 0.5, 1.0),
                  sweep_seeds=(0,), seeds=(0, 1, 2), max_widen=1, evals=4)


def record(combiner: str, setting: Synced, lr: float, seed: int, loss: float) -> dict:
    """What a finished run's record holds, for a run ending at ``loss``."""
    return {"combiner": combiner, "setting": setting.label, "lr": lr, "seed": seed, "reading": READING,
            "test_loss": loss, "score": 1 - loss / 4, "diverged": not math.isfinite(loss)}


def made_up(point: Point) -> float:
    """Losses with a known answer: averaging's best rate doubles with N (0.5 at 2 workers, 1.0 at
    4, so at 4 it sits at the first axis's top), Adasum's is 0.5 everywhere; seeds add noise."""
    s, lr = point.setting, point.lr
    best = 0.5 * s.workers / 2 if point.combiner == "average" else 0.5
    return 1.0 + abs(math.log2(lr / best)) + 0.01 * point.seed + 0.1 * s.sync_every


def test_the_plan_sweeps_then_widens_then_seeds():
    records: list[dict] = []
    points = next_local_points(SECTION, TINY, records)
    assert len(points) == 2 * len(TINY.settings) * len(TINY.lrs) and {p.seed for p in points} == {0}
    records += [record(p.combiner, p.setting, p.lr, p.seed, made_up(p)) for p in points]
    # Averaging's best at 4 workers sits at the top of the axis: one 2x step more, for both
    # combiners, at those settings only.
    points = next_local_points(SECTION, TINY, records)
    assert {(p.combiner, p.setting.workers, p.lr) for p in points} == {(c, 4, 2.0) for c in ("adasum", "average")}
    records += [record(p.combiner, p.setting, p.lr, p.seed, made_up(p)) for p in points]
    points = next_local_points(SECTION, TINY, records)
    assert {p.seed for p in points} == {1, 2}
    wanted = {("adasum", s.label, 0.5) for s in TINY.settings}  # the one rate, everywhere
    wanted |= {("average", s.label, lr) for s in TINY.settings if s.workers == 2 for lr in (0.25, 0.5, 1.0)}
    wanted |= {("average", s.label, lr) for s in TINY.settings if s.workers == 4 for lr in (0.5, 1.0, 2.0)}
    assert {(p.combiner, p.setting.label, p.lr) for p in points} == wanted
    records += [record(p.combiner, p.setting, p.lr, p.seed, made_up(p)) for p in points]
    assert next_local_points(SECTION, TINY, records) == []


def test_the_common_rate_has_the_smallest_worst_excess():
    runs = {"a": {0.5: [{"seed": 0, "test_loss": 1.0, "diverged": False}],
                  1.0: [{"seed": 0, "test_loss": 1.2, "diverged": False}],
                  2.0: [{"seed": 0, "test_loss": 3.0, "diverged": False}]},
            "b": {0.5: [{"seed": 0, "test_loss": 3.0, "diverged": False}],
                  1.0: [{"seed": 0, "test_loss": 1.1, "diverged": False}],
                  2.0: [{"seed": 0, "test_loss": 1.0, "diverged": False}]}}
    assert common_rate(runs, (0,)) == 1.0  # 20% and 10% above the bests, where 0.5 and 2 lose 200%
    runs["b"][1.0] = [{"seed": 0, "test_loss": math.nan, "diverged": True}]
    assert common_rate(runs, (0,)) == 0.5  # ties at +200% go to the smaller rate


def _complete(losses) -> list[dict]:
    """Every run the plan asks for on TINY, with ``losses(point)``."""
    records: list[dict] = []
    while points := next_local_points(SECTION, TINY, records):
        records += [record(p.combiner, p.setting, p.lr, p.seed, losses(p)) for p in points]
    return records


def test_the_verdicts_follow_the_runs():
    records = _complete(made_up)
    # Averaging tuned per setting and Adasum at 0.5 reach the same losses: they match everywhere.
    q1 = match_rows(records, TINY)
    assert [r["verdict"] for r in q1] == ["reproduces"] * 5
    # Averaging's one rate per H (0.5, its best at 2 workers) loses at 4; Adasum's 0.5 serves both.
    q2 = one_rate_rows(records, TINY)
    assert [r["verdict"] for r in q2] == ["reproduces"] * 3
    assert "N2: Adasum same, averaging same; N4: Adasum same, averaging worse" in q2[0]["evidence"]
    # Adasum 0.2 worse everywhere at H = 4: it does not match there, and does not serve.
    worse = _complete(lambda p: made_up(p) + (0.2 if p.combiner == "adasum" and p.setting.sync_every == 4 else 0))
    assert [r["verdict"] for r in match_rows(worse, TINY)] == ["reproduces", "reproduces", "does not", "does not", "partly"]
    assert [r["verdict"] for r in one_rate_rows(worse, TINY)] == ["reproduces", "does not", "partly"]
    # Averaging's one rate also serving every N: the contrast fails ("same").
    flat = _complete(lambda p: made_up(p.__class__(p.reading, "adasum", p.setting, p.lr, p.seed)))
    assert [r["verdict"] for r in one_rate_rows(flat, TINY)] == ["does not"] * 3


def test_the_orthogonality_reading_takes_adasum_at_its_one_rate():
    records = _complete(made_up)
    # Adasum's scaling of the deltas: 0.9 at H = 1, 0.6 at H = 4 (per seed a little noise).
    curves = [{"run": i, "orth/scale": (0.9 if r["setting"].endswith("H1") else 0.6) + 0.001 * r["seed"],
               "orth/cos": 0.1, "orth/layer/w/scale": 0.7}
              for i, r in enumerate(records) if r["combiner"] == "adasum"]
    table, rows = orthogonality_rows(records, curves, TINY)
    assert [(t["N"], t["H"], t["seeds"]) for t in table] == [(2, 1, 3), (4, 1, 3), (2, 4, 3), (4, 4, 3)]
    assert table[0]["scale"].startswith("0.901") and table[0]["w/scale"] == "0.700"
    assert [r["verdict"] for r in rows] == ["reproduces"] * 3
    rising = [{**c, "orth/scale": 1.5 - c["orth/scale"]} for c in curves]
    assert orthogonality_rows(records, rising, TINY)[1][-1]["verdict"] == "does not"


def test_the_shipped_scales_keep_the_protocol():
    for name in ("cpu", "gpu"):
        scale = SECTION.scale(name)
        assert set(scale.workers) >= {4, 8, 16} and set(scale.sync_every) == {1, 16, 64, 256}
        assert len(scale.seeds) >= 5 and scale.warmup > 0
        for s in scale.settings:  # every run: the same inner steps, a whole number of syncs
            config = local_spec(SECTION, scale, Point(READING, "average", s, 1.0, 0)).config
            assert Steps(config, s.workers, config.samples).total_steps == scale.budget
            assert (config.outer, config.mode, config.schedule) == ("nesterov", "delta", "cosine")
    with pytest.raises(ConfigError, match="multiple"):
        replace(TINY, budget=6, seeds=tuple(range(5))).check()


def test_a_tiny_study_runs_end_to_end_and_resumes(tmp_path):
    tiny = replace(TINY, lrs=(0.5, 1.0), seeds=(0, 1), max_widen=0)
    records, curves, ran = run_local_study(SECTION, tiny, tmp_path, progress=False)
    assert ran == len(records) == len(list((tmp_path / "runs").glob("*.json")))
    assert next_local_points(SECTION, tiny, records) == []
    stored = json.loads(next((tmp_path / "runs").glob("*-H4-*.json")).read_text())
    assert (stored["config"]["sync_every"], stored["config"]["outer"], stored["summary"]["steps"]) == (4, "nesterov", 8)
    # The deltas' statistics, per layer, at the evaluations after a synchronisation.
    assert any("orth/layer/0.weight/scale" in row for row in curves)
    written = write_local_report(records, curves, tmp_path, "tiny", tiny)
    assert all(p.exists() for p in written)
    assert "| question | setting | verdict | evidence |" in (tmp_path / "diloco.md").read_text()
    assert run_local_study(SECTION, tiny, tmp_path, progress=False)[2] == 0


def test_the_command_refuses_a_bad_scale(capsys, tmp_path):
    assert main(["study", "diloco", "--scale", "tpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("adasum: error: ")
