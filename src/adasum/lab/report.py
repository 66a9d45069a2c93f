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
from adasum.lab.records import write_csv

__all__ = ["markdown_table", "lr_grid_table", "distance_table", "has_distances", "write_report"]

_TABLE_COLUMNS = ("optimizer", "reducer", "workers", "batch", "accum", "examples_per_step", "lr",
                  "steps", "score", "train_loss", "steps_to_target", "epochs_to_target", "noise_scale",
                  "dist_adasum", "dist_average", "dist_sum")
#: What makes runs the same setting in the learning-rate grid: everything but the learning rate.
_SETTING = ("optimizer", "reducer", "workers", "batch", "accum", "examples_per_step")


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
    note = "\nCells: epochs to the target (final test score); `-` = target not reached; `div` = diverged.\n"
    return "\n".join(lines) + "\n" + (note if any(s["target"] is not None for s in summaries) else "")


def has_distances(summaries: Sequence[dict]) -> bool:
    """Whether any run measured the distance to sequential SGD (``adasum train`` runs and
    ``--no-distances`` sweeps do not)."""
    return any(not math.isnan(s.get("dist_adasum", math.nan)) for s in summaries)


def distance_table(summaries: Sequence[dict]) -> str:
    """Per run (workers, learning rate): the mean distance of each reducer's update to
    sequential SGD, the closest reducer, and Adasum's length relative to the average."""
    lines = _header(["workers", "lr", *(f"dist_{r}" for r in REDUCERS), "closest", "adasum_scale"])
    for s in sorted(summaries, key=lambda s: (s["lr"], s["workers"])):
        # With one worker every reducer is the identity: no reducer is closer than another.
        closest = min(REDUCERS, key=lambda r: s[f"dist_{r}"]) if s["workers"] > 1 else "(all equal)"
        cells = [s["workers"], s["lr"], *(s[f"dist_{r}"] for r in REDUCERS), closest, s["adasum_scale"]]
        lines.append(_row(_cell(v) for v in cells))
    return "\n".join(lines) + "\n"


def write_report(summaries: list[dict], curves: list[dict], out: Path, title: str) -> list[Path]:
    """``summary.csv``, ``curves.csv``, ``table.md``, ``by_lr.md``, ``distances.md`` when the
    runs measured them, and the plots that the sweep's varying dimensions make meaningful;
    returns the files written."""
    from adasum.lab.plots import write_plots  # matplotlib is slow to import; only reports need it

    out.mkdir(parents=True, exist_ok=True)
    write_csv(summaries, out / "summary.csv")
    write_csv(curves, out / "curves.csv")
    (out / "table.md").write_text(f"# {title}\n\n" + markdown_table(summaries, _TABLE_COLUMNS))
    (out / "by_lr.md").write_text(f"# {title}\n\n" + lr_grid_table(summaries))
    written = [out / "summary.csv", out / "curves.csv", out / "table.md", out / "by_lr.md"]
    distances = has_distances(summaries)
    if distances:
        (out / "distances.md").write_text(f"# {title}\n\n" + distance_table(summaries))
        written.append(out / "distances.md")
    return written + write_plots(summaries, curves, out, title, distances=distances)
