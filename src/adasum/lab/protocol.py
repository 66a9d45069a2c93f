"""The protocol of large-batch studies (as in Shallue et al. 2018, "Measuring the effects of
data parallelism on neural network training"), applied to finished runs.

For each setting (examples before communication E = workers x per-worker batch x
accumulation, or an elastic change of the worker count) and each combiner, every learning
rate of one absolute axis ran with the sweep's seeds, and the best rate and its two neighbours
with more. A run counts its steps to the target score (the first of two consecutive
evaluations at or above it, :func:`adasum.lab.records.crossing`), or none when the target was
not reached within the budget. The best learning rate of a (setting, combiner) is the one with
the fewest median steps over the sweep's seeds, which every rate has (a seed that missed the
target counts as infinitely many steps, so a learning rate that fails for most seeds never
wins); ties go to the learning rate that more seeds brought to the target, then to the higher
median final score (which decides where no rate reaches the target by most seeds), then to the
smaller learning rate. Reported: the median and the spread (min-max) of the steps over every
seed at that learning rate.

A run record is a run's summary (:func:`adasum.lab.records.summarize`) plus the study's own
fields: ``combiner``, ``reading`` (``tuned`` or ``recipe``), ``setting`` (a label such as
``N8 b16 a4`` or ``N4>16@2``), ``first_workers`` and ``resize_to`` (the worker count before and
after an elastic change).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Sequence

from adasum.lab.report import markdown_table

__all__ = ["steps_of", "best_lr", "group_by_lr", "best_per_setting", "protocol_table", "elastic_rows", "elastic_table", "GROUP",
           "LATE"]

#: What makes runs the same point of the study, apart from the learning rate and the seed.
GROUP = ("optimizer", "combiner", "setting")
#: A crossing after this fraction of the run's budget is flagged: the budget may have cut the
#: run short (with the learning rate decayed to zero at the end, a late crossing is the
#: schedule's as much as the combiner's). A crossing within the warm-up is flagged too: the
#: rate there is a fraction of the one the axis names.
LATE = 0.9


def steps_of(record: dict) -> float:
    """Steps to the target, ``inf`` if the run did not reach it within its budget."""
    reached = record.get("steps_to_target")
    return math.inf if reached is None or record.get("diverged") else float(reached)


def _at_lr(runs: Sequence[dict]) -> dict:
    """The protocol's numbers for one learning rate: its runs over the seeds."""
    steps = sorted(steps_of(r) for r in runs)
    reached = [s for s in steps if math.isfinite(s)]
    epochs = [r["epochs_to_target"] for r in runs if math.isfinite(steps_of(r))]
    crossings = [(steps_of(r), r) for r in runs if math.isfinite(steps_of(r))]
    return {
        "lr": runs[0]["lr"], "seeds": len(runs), "reached": len(reached),
        "median_steps": statistics.median(steps), "min_steps": steps[0], "max_steps": steps[-1],
        "median_epochs": statistics.median(epochs) if len(reached) * 2 > len(runs) else math.inf,
        "median_score": statistics.median(r["score"] for r in runs),
        # Records from before the budget was stored know only the steps run (which end soon
        # after a crossing when runs stop at the target): their ``late`` is then an overcount.
        "late": sum(s > LATE * r.get("budget", r["steps"]) for s, r in crossings),
        "in_warmup": sum(s <= r.get("warmup", 0) for s, r in crossings),
    }


def _rank(runs: Sequence[dict]) -> tuple:
    """What orders learning rates: fewer median steps, more seeds at the target, a higher
    median score, a smaller rate."""
    c = _at_lr(runs)
    return c["median_steps"], -c["reached"], -c["median_score"], c["lr"]


def best_lr(by_lr: dict[float, list[dict]], seeds: Collection[int] | None = None) -> float:
    """The best learning rate of one (setting, combiner), judged on the runs of ``seeds`` only
    (None: all), so that rates that ran with more seeds are not judged on other evidence."""
    def chosen(runs: list[dict]) -> list[dict]:
        return [r for r in runs if seeds is None or r["seed"] in seeds] or runs

    return min(by_lr, key=lambda lr: _rank(chosen(by_lr[lr])))


def group_by_lr(records: Sequence[dict]) -> dict[tuple, dict[float, list[dict]]]:
    """Runs by (optimizer, combiner, setting), then by learning rate."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in GROUP), {}).setdefault(r["lr"], []).append(r)
    return groups


def best_per_setting(records: Sequence[dict], seeds: Collection[int] | None = None) -> list[dict]:
    """One row per (optimizer, combiner, setting): the best learning rate (judged on ``seeds``,
    :func:`best_lr`) and its median and spread of steps to the target over all its seeds.
    Rows by optimizer, combiner, then E."""
    rows = []
    for key, by_lr in group_by_lr(records).items():
        lr = best_lr(by_lr, seeds)
        first = next(iter(by_lr.values()))[0]
        # A best learning rate at either end of the axis may not be the best there is.
        edge = lr in (min(by_lr), max(by_lr)) and len(by_lr) > 1
        rows.append({**dict(zip(GROUP, key)), "examples": first["examples_per_step"],
                     "workers": first["first_workers"], "lrs_tried": len(by_lr), "grid_edge": edge,
                     **_at_lr(by_lr[lr])})
    return sorted(rows, key=lambda r: (r["optimizer"], r["combiner"], r["examples"], r["setting"]))


def _flags(row: dict) -> str:
    flags = [f"{row[key]} {name}" for key, name in (("late", "late"), ("in_warmup", "in warm-up")) if row.get(key)]
    return f" ({', '.join(flags)})" if flags else ""


def _steps_cell(value: float) -> str:
    return "-" if math.isinf(value) else f"{value:.4g}"


_PROTOCOL_COLUMNS = ("optimizer", "combiner", "setting", "E", "best lr", "reached",
                     "median steps", "spread (min-max)", "median epochs", "median score")


def protocol_table(rows: Sequence[dict]) -> str:
    """The protocol's result as markdown: per setting and combiner the best learning rate,
    how many seeds reached the target, the median steps and their spread."""
    cells = [{
        "optimizer": r["optimizer"], "combiner": r["combiner"], "setting": r["setting"],
        "E": r["examples"], "best lr": f"{r['lr']:g}" + (" (edge)" if r["grid_edge"] else ""),
        "reached": f"{r['reached']}/{r['seeds']}" + _flags(r),
        "median steps": _steps_cell(r["median_steps"]),
        "spread (min-max)": f"{_steps_cell(r['min_steps'])}-{_steps_cell(r['max_steps'])}",
        "median epochs": _steps_cell(r["median_epochs"]), "median score": r["median_score"],
    } for r in rows]
    note = ("\nSteps and epochs to the target at the best learning rate of the axis (fewest median "
            "steps over the sweep's seeds; where no rate reaches the target, the best median final "
            "score), over every seed run there; `reached`: seeds that reached the target within the "
            f"budget, `late`: of those, how many only in the last {1 - LATE:.0%} of it (the budget may "
            "have cut the others short), `in warm-up`: how many before the warm-up ended (at a "
            "fraction of the named rate); `-`: not reached (for the median: not by most seeds); "
            "`(edge)`: the best rate is the axis's smallest or largest even after widening.\n")
    return markdown_table(cells, _PROTOCOL_COLUMNS) + note


def elastic_rows(records: Sequence[dict], seeds: Collection[int] | None = None) -> list[dict]:
    """Per combiner and elastic change N1 -> N2: the run resumed with N2 workers at the
    learning rate that was best for N1 (what a user who does not retune gets), against the
    constant-N1 and constant-N2 settings at their own best learning rates (judged on ``seeds``)."""
    best = {(r["optimizer"], r["combiner"], r["setting"]): r for r in best_per_setting(records, seeds)}
    constant = {(r["optimizer"], r["combiner"], r["first_workers"]): r["setting"]
                for r in records if r["resize_to"] is None}
    rows = []
    for (optimizer, combiner, setting), elastic in best.items():
        first = next(r for r in records if r["setting"] == setting)
        if first["resize_to"] is None:
            continue
        before = best.get((optimizer, combiner, constant.get((optimizer, combiner, first["first_workers"]))))
        after = best.get((optimizer, combiner, constant.get((optimizer, combiner, first["resize_to"]))))
        same_lr = [r for r in records if r["setting"] == setting and r["optimizer"] == optimizer
                   and r["combiner"] == combiner and before is not None and r["lr"] == before["lr"]]
        rows.append({"optimizer": optimizer, "combiner": combiner, "setting": setting,
                     "elastic": _at_lr(same_lr) if same_lr else None,
                     "elastic_best": elastic, "before": before, "after": after})
    return sorted(rows, key=lambda r: (r["optimizer"], r["setting"], r["combiner"]))


def _summary_cell(r: dict | None) -> str:
    if r is None:
        return "(not run)"
    return (f"{_steps_cell(r['median_steps'])} [{_steps_cell(r['min_steps'])}-{_steps_cell(r['max_steps'])}] "
            f"at lr {r['lr']:g}, {r['reached']}/{r['seeds']}")


def elastic_table(rows: Sequence[dict]) -> str:
    """Elastic training as markdown: median [min-max] steps to the target, the learning rate
    and the seeds that reached the target."""
    cells = [{
        "optimizer": r["optimizer"], "combiner": r["combiner"], "change": r["setting"],
        "resumed at N1's best lr": _summary_cell(r["elastic"]),
        "resumed, best lr": _summary_cell(r["elastic_best"]),
        "constant N1": _summary_cell(r["before"]), "constant N2": _summary_cell(r["after"]),
    } for r in rows]
    note = ("\nCells: median [min-max] steps to the target over the seeds, the learning rate, seeds "
            "that reached it. A combiner that needs no retuning has the first column close to the "
            "second.\n")
    return markdown_table(cells, list(cells[0]) if cells else ["change"]) + note
