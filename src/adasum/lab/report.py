"""What a sweep or the demo writes: the CSV files, the markdown tables and (through
:mod:`adasum.lab.plots`) the plots.

A summary is one dict per run, as :func:`adasum.lab.records.summarize` returns it, with the
distances to sequential SGD that :func:`adasum.lab.simulate.simulate_run` adds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from adasum.lab.config import REDUCERS
from adasum.lab.records import metric_of, targets_of, write_csv

__all__ = ["markdown_table", "runs_table", "lr_grid_table", "distance_table", "has_distances", "write_report",
           "reached"]

_TABLE_COLUMNS = ("optimizer", "reducer", "workers", "batch", "accum", "examples_per_step", "lr",
                  "steps", "score", "train_loss", "target", "steps_to_target", "epochs_to_target", "noise_scale",
                  "dist_adasum", "dist_average", "dist_sum")
#: What makes runs the same setting in the learning-rate grid: everything but the learning rate.
_SETTING = ("optimizer", "reducer", "workers", "batch", "accum", "examples_per_step")
#: The options a sweep varies, in the order the tables show them.
_OPTIONS = (*_SETTING, "lr")
_NO_TARGET = "no target set"


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(columns: Sequence[str]) -> list[str]:
    return [_row(columns), "|" + "---|" * len(columns)]


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """``rows`` as a markdown table of ``columns``; a missing value shows as ``-``."""
    lines = _header(columns) + [_row(_cell(r.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def reached(summary: dict) -> str:
    """One run against its target score, in words: "target 0.95 reached at step 57 (epoch
    5.07)", "target 0.95 not reached" or "no target set"."""
    if summary.get("target") is None:
        return _NO_TARGET
    goal = f"target {summary['target']:g}"
    if summary["steps_to_target"] is None:
        return f"{goal} not reached"
    return f"{goal} reached at step {summary['steps_to_target']} (epoch {summary['epochs_to_target']:.3g})"


def _shown(summary: dict) -> dict:
    """The summary as a table of runs shows it: words where the target columns hold no number."""
    missing = _NO_TARGET if summary.get("target") is None else "not reached"
    return {**summary, "target": "none" if summary.get("target") is None else summary["target"],
            **{k: missing for k in ("steps_to_target", "epochs_to_target") if summary.get(k) is None}}


def _target_note(summaries: Sequence[dict]) -> str:
    """The line under a table of runs: what the score is and what the target columns count."""
    metric, targets = metric_of(summaries), targets_of(summaries)
    if not targets:
        return f"score: {metric}; {_NO_TARGET} (--target SCORE reports the steps and epochs to it).\n"
    return (f"score: {metric}; steps_to_target: the step of the first of two consecutive evaluations "
            f"at {metric} >= target ({', '.join(f'{t:g}' for t in targets)}); epochs_to_target: its epoch.\n")


def runs_table(summaries: Sequence[dict], columns: Sequence[str]) -> str:
    """One row per run and a line saying what the score is and which target the steps count to
    ("no target set" where there is none, never a bare ``-``)."""
    return markdown_table([_shown(s) for s in summaries], columns) + "\n" + _target_note(summaries)


def _grid_cell(s: dict) -> str:
    """``epochs to target (final score)``; ``div`` for a diverged run, ``-`` for epochs when the
    target was not reached."""
    if s["diverged"]:
        return "div"
    reached = "-" if s["epochs_to_target"] is None else f"{s['epochs_to_target']:.3g}"
    return f"{reached} ({_cell(s['score'])})" if s["target"] is not None else _cell(s["score"])


def lr_grid_table(summaries: Sequence[dict]) -> str:
    """One row per setting (optimizer, reducer, workers, batch, accum), one column per learning
    rate: epochs to the target and final score, or ``div``. Shows at a glance which learning
    rates each reducer tolerates and the largest setting that still reaches the target."""
    lrs = sorted({s["lr"] for s in summaries})
    rows: dict[tuple, dict[float, dict]] = {}
    for s in summaries:
        rows.setdefault(tuple(s[k] for k in _SETTING), {})[s["lr"]] = s
    lines = _header(["optimizer", "reducer", "N", "batch", "accum", "E"] + [f"lr {lr:g}" for lr in lrs])
    # Rows by optimizer, reducer, then growing E, and for equal E fewer workers first.
    for key, by_lr in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][5], kv[0][2])):
        lines.append(_row([str(v) for v in key] + [_grid_cell(by_lr[lr]) if lr in by_lr else "" for lr in lrs]))
    metric, targets = metric_of(summaries), targets_of(summaries)
    if targets:
        note = (f"\nCells: epochs to {metric} {', '.join(f'{t:g}' for t in targets)} (final {metric}); "
                "`-` = target not reached; `div` = diverged.\n")
    else:
        note = f"\nCells: final {metric}; `div` = diverged; {_NO_TARGET} (--target SCORE adds the epochs to it).\n"
    return "\n".join(lines) + "\n" + note


def has_distances(summaries: Sequence[dict]) -> bool:
    """Whether any run measured the distance to sequential SGD (``adasum train`` runs and
    ``--no-distances`` sweeps do not)."""
    return any(not math.isnan(s.get("dist_adasum", math.nan)) for s in summaries)


_DISTANCE_NOTE = (
    "\nOne row per run: `reducer` is the one it trained with; at each of its evaluation points every "
    "reducer's update is taken from the run's weights. dist_R: |lr * R(the workers' gradients) - "
    "sequential SGD| / |sequential SGD| (mean over the evaluation points), where sequential SGD takes the "
    "workers' batches one after the other (what one worker would do with them). closest: the "
    "smallest. adasum_scale: |Adasum| / |average| of the gradients: 1 = Adasum averaged them (they "
    "agree), N = it summed them (orthogonal), above N only where some point partly against each "
    "other (negative cosines: Adasum then keeps more than their sum, in which they cancel).\n")


def _varying(summaries: Sequence[dict], always: Sequence[str]) -> list[str]:
    """The options of :data:`_OPTIONS` that take more than one value in ``summaries``, and ``always``."""
    return [k for k in _OPTIONS if k in always or len({s[k] for s in summaries}) > 1]


def distance_table(summaries: Sequence[dict]) -> str:
    """Per run (a column for its reducer, workers, learning rate, and every other option that
    varies): the mean distance of each reducer's update to sequential SGD, the closest reducer,
    and Adasum's length relative to the average."""
    options = _varying(summaries, always=("reducer", "workers", "lr"))
    lines = _header([*options, *(f"dist_{r}" for r in REDUCERS), "closest", "adasum_scale"])
    order = ("lr", *(k for k in options if k not in ("lr", "workers")), "workers")
    for s in sorted(summaries, key=lambda s: tuple(s[k] for k in order)):
        # With one worker every reducer is the identity: no reducer is closer than another.
        closest = min(REDUCERS, key=lambda r: s[f"dist_{r}"]) if s["workers"] > 1 else "(all equal)"
        cells = [*(s[k] for k in options), *(s[f"dist_{r}"] for r in REDUCERS), closest, s["adasum_scale"]]
        lines.append(_row(_cell(v) for v in cells))
    return "\n".join(lines) + "\n" + _DISTANCE_NOTE


def write_report(summaries: list[dict], curves: list[dict], out: Path, title: str) -> list[Path]:
    """``summary.csv``, ``curves.csv``, ``table.md``, ``by_lr.md``, ``distances.md`` when the
    runs measured them, and the plots that the sweep's varying dimensions make meaningful;
    returns the files written."""
    from adasum.lab.plots import write_plots  # matplotlib is slow to import; only reports need it

    out.mkdir(parents=True, exist_ok=True)
    write_csv(summaries, out / "summary.csv")
    write_csv(curves, out / "curves.csv")
    distances = has_distances(summaries)
    # Distance columns only where the runs measured them: a column of "-" would say nothing.
    columns = [c for c in _TABLE_COLUMNS if distances or not c.startswith("dist_")]
    (out / "table.md").write_text(f"# {title}\n\n" + runs_table(summaries, columns))
    (out / "by_lr.md").write_text(f"# {title}\n\n" + lr_grid_table(summaries))
    written = [out / "summary.csv", out / "curves.csv", out / "table.md", out / "by_lr.md"]
    if distances:
        (out / "distances.md").write_text(f"# {title}\n\n" + distance_table(summaries))
        written.append(out / "distances.md")
    return written + write_plots(summaries, curves, out, title, distances=distances)
