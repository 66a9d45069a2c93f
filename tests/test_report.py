"""What the lab's reports say: the target and the metric named wherever steps to the target are,
tables with a column per option the runs vary, and plots that show every setting of every
reducer. Single-process: the formatting functions, and one tiny simulated sweep."""

from __future__ import annotations

import pytest

from adasum.lab import plots
from adasum.lab.cli import main
from adasum.lab.config import RunConfig
from adasum.lab.report import distance_table, lr_grid_table, reached, runs_table, write_report
from adasum.lab.simulate import sweep
from adasum.lab.tasks import load_task

COLUMNS = ("reducer", "workers", "score", "target", "steps_to_target", "epochs_to_target")


def summary(**changes) -> dict:
    base = {"optimizer": "momentum", "reducer": "adasum", "workers": 4, "batch": 32, "accum": 1,
            "examples_per_step": 128, "lr": 0.05, "score": 0.9614, "metric": "test accuracy", "target": 0.95,
            "steps_to_target": 57, "epochs_to_target": 5.07, "diverged": False}
    return {**base, **changes}


def test_a_run_says_its_target_or_that_none_was_set():
    assert reached(summary()) == "target 0.95 reached at step 57 (epoch 5.07)"
    assert reached(summary(steps_to_target=None, epochs_to_target=None)) == "target 0.95 not reached"
    assert reached(summary(target=None, steps_to_target=None, epochs_to_target=None)) == "no target set"


def test_a_table_without_a_target_says_so_and_names_the_metric():
    table = runs_table([summary(target=None, steps_to_target=None, epochs_to_target=None)], COLUMNS)
    rows = table.splitlines()
    assert rows[2] == "| adasum | 4 | 0.9614 | none | no target set | no target set |"
    assert rows[-1].startswith("score: test accuracy; no target set (--target SCORE")
    assert " - " not in table


def test_a_table_with_a_target_states_it_and_what_was_not_reached():
    table = runs_table([summary(), summary(reducer="average", score=0.922, steps_to_target=None,
                                           epochs_to_target=None)], COLUMNS)
    rows = table.splitlines()
    assert rows[2:4] == ["| adasum | 4 | 0.9614 | 0.95 | 57 | 5.07 |",
                         "| average | 4 | 0.922 | 0.95 | not reached | not reached |"]
    assert "at test accuracy >= target (0.95)" in rows[-1]


def test_a_record_from_before_the_metric_was_named_reads_as_score():
    old = summary(target=None, steps_to_target=None, epochs_to_target=None)
    del old["metric"]
    assert runs_table([old], COLUMNS).splitlines()[-1].startswith("score: score; no target set")


def test_the_lr_grid_names_the_metric_and_the_target():
    with_target = lr_grid_table([summary()]).splitlines()
    assert with_target[-1].startswith("Cells: epochs to test accuracy 0.95 (final test accuracy)")
    without = lr_grid_table([summary(target=None, metric="test R^2")]).splitlines()
    assert without[2].endswith("| 0.9614 |")
    assert without[-1].startswith("Cells: final test R^2;") and "no target set" in without[-1]


def distances(**changes) -> dict:
    return summary(**{"dist_adasum": 0.36, "dist_average": 0.74, "dist_sum": 0.09, "adasum_scale": 2.56, **changes})


def test_distance_rows_of_runs_with_other_reducers_are_told_apart():
    """Runs trained with different reducers measure every reducer's distance: without the
    run's reducer two rows of the same workers and lr read as duplicates."""
    table = distance_table([distances(), distances(reducer="average", adasum_scale=2.64)]).splitlines()
    assert table[0] == ("| reducer | workers | lr | dist_adasum | dist_average | dist_sum | closest | "
                        "adasum_scale |")
    assert [row.split(" | ")[0] for row in table[2:4]] == ["| adasum", "| average"]
    assert "above N only where some point partly against each other" in table[-1]


def test_distance_table_has_a_column_per_option_that_varies():
    runs = [distances(batch=b, examples_per_step=4 * b, optimizer=o) for b in (16, 32) for o in ("sgd", "momentum")]
    header = distance_table(runs).splitlines()[0]
    assert header.startswith("| optimizer | reducer | workers | batch | examples_per_step | lr | dist_adasum")


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    """A tiny sweep (2 reducers x 1 and 2 workers, one epoch of digits) reported with its target
    and as the same runs without one (what their summaries say when no target is set): the
    figures each report drew, by file name and target."""
    base = RunConfig(epochs=1, batch=16, target=0.5, evals_per_epoch=4)
    summaries, curves = sweep(load_task("digits-mlp"), base, workers=[1, 2], reducers=["adasum", "average"],
                              optimizers=["momentum"], lrs=[0.05], batches=[16], accums=[1], distances=False)
    untargeted = [{**s, "target": None, "steps_to_target": None, "epochs_to_target": None} for s in summaries]
    drawn: dict = {}
    original = plots.save_figure
    for target, runs in ((0.5, summaries), (None, untargeted)):
        def keep(fig, path, target=target):
            drawn[path.name, target] = [(ax.get_title(), ax.get_ylabel(), [line.get_label() for line in ax.lines])
                                        for ax in fig.axes]
            return original(fig, path)

        plots.save_figure = keep
        try:
            write_report(runs, curves, tmp_path_factory.mktemp("report"), "tiny")
        finally:
            plots.save_figure = original
    return drawn


def test_curves_show_every_reducer_at_every_worker_count(figures):
    axes = figures["curves.png", 0.5]
    assert [title for title, _, _ in axes[:2]] == ["N=1 worker, E=16", "N=2 workers, E=32"]
    for _, _, labels in axes[2:]:  # the score panels
        assert labels == ["momentum/adasum", "momentum/average", "target 0.5"]
    assert axes[2][1] == "test accuracy"


def test_without_a_target_no_target_line_and_scaling_shows_the_final_score(figures):
    assert all("target" not in " ".join(labels) for _, _, labels in figures["curves.png", None])
    (title, ylabel, _), = figures["scaling.png", None]
    assert ylabel.startswith("final test accuracy (best lr") and "no target set" in title
    (_, ylabel, labels), = figures["scaling.png", 0.5]
    assert ylabel.startswith("epochs to test accuracy 0.5") and labels[-1].startswith("epoch budget")


def test_simulate_prints_the_metric_and_the_target(tmp_path, capsys):
    args = ["simulate", "--workers", "2", "--reducers", "adasum", "--epochs", "1", "--no-distances",
            "--out", str(tmp_path)]
    assert main([*args, "--target", "0.99"]) == 0
    assert main(args) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "N=2" in line]
    assert "test accuracy 0." in err[0] and ", target 0.99 not reached," in err[0]
    assert ", no target set," in err[1] and "None" not in err[1]


def test_task_metric_names_the_score():
    assert load_task("digits-mlp").metric == "test accuracy"
    assert load_task("linear", samples=64).metric == "test R^2"


def test_differences_name_each_option_by_its_flag():
    saved = RunConfig(lr=0.05, outer=None)
    assert saved.differences(RunConfig(lr=0.1)) == ["--lr 0.05 (this run: 0.1)"]
    assert saved.differences(saved.with_(outer="sgd", batch=16)) == [
        "--batch 32 (this run: 16)", "--outer-optimizer not set (this run: sgd)"]
