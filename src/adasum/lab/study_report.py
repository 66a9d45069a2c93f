"""What ``adasum study`` writes at the end: the protocol's table, the readings' verdicts, the
orthogonality diagnostics, and the plots (steps to the target against E per combiner, log-log
with the spread over seeds and the perfect-scaling line; the diagnostics over training)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from adasum.lab.critical import fit_over_seeds
from adasum.lab.protocol import GROUP, best_lr, best_per_setting, elastic_rows, elastic_table, group_by_lr, protocol_table
from adasum.lab.readings import BASELINE, CANDIDATE, ablations, candidates, reading_table, recipe_rows, tuned_rows
from adasum.lab.records import write_csv
from adasum.lab.report import markdown_table
from adasum.lab.sections import Scale

__all__ = ["write_study_report", "orthogonality_rows", "baseline_fit_note"]


def _best_runs(records: Sequence[dict], best: Sequence[dict]) -> dict[tuple, list[int]]:
    """Indices of the tuned reading's runs (every seed) at each group's best learning rate."""
    chosen = {tuple(b[k] for k in GROUP): b["lr"] for b in best}
    runs: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        key = tuple(r[k] for k in GROUP)
        if r["reading"] == "tuned" and chosen.get(key) == r["lr"]:
            runs.setdefault(key, []).append(i)
    return runs


def baseline_fit_note(tuned: Sequence[dict], b_crit: float, sweep_seeds: Sequence[int]) -> str:
    """The critical batch the averaging baseline's own results imply, beside the ``b_crit``
    the section's grid was set on: ``S = S_min (1 + B_crit / E)`` fitted to the median steps
    to the target over the seeds at the baseline's best rate per E, with bootstrap intervals
    over seeds (:func:`adasum.lab.critical.fit_over_seeds`). Left out: an E where most of those
    seeds cross inside the warm-up, elastic settings, and of two settings with one E the one
    that accumulates more."""
    groups = group_by_lr([r for r in tuned if r["combiner"] == BASELINE and r["resize_to"] is None])
    steps: dict[int, tuple[int, list]] = {}
    for by_lr in groups.values():
        runs = by_lr[best_lr(by_lr, sweep_seeds)]
        e, accum = runs[0]["examples_per_step"], runs[0]["accum"]
        # A crossing inside the warm-up was made at a fraction of the rate: it measures the
        # schedule, not the batch (the warm-up grows with the budget, so with 1/E).
        after = sum(r["steps_to_target"] is None or r["steps_to_target"] > r["warmup"] for r in runs)
        if 2 * after > len(runs) and (e not in steps or accum < steps[e][0]):
            steps[e] = (accum, [r["steps_to_target"] for r in runs])
    intro = (f"The averaging baseline's own steps to the target (median over the seeds at its best rate, at each E "
             f"where most of them cross after the warm-up: {', '.join(f'{e:,}' for e in sorted(steps)) or 'none'}) "
             f"against the grid's b_crit of {b_crit:g}: ")
    if len(steps) < 3:
        return intro + "too few E to fit S = S_min (1 + B_crit / E) to (three or more needed).\n"
    try:
        fit, b_ci, s_ci = fit_over_seeds({e: s for e, (_, s) in steps.items()})
    except ValueError as error:
        return intro + f"S = S_min (1 + B_crit / E) does not fit them ({error}).\n"
    largest = max(steps)
    return (intro + f"S = S_min (1 + B_crit / E) fits B_crit {fit.b_crit:,.0f} [{b_ci[0]:,.0f}, {b_ci[1]:,.0f}] "
            f"and S_min {fit.s_min:.1f} [{s_ci[0]:.1f}, {s_ci[1]:.1f}] ({100 * fit.residual:.1f}% rms; 95% bootstrap "
            f"intervals over seeds), so the largest E, {largest:,}, is {largest / fit.b_crit:.1f}x the fitted B_crit.\n")


def _median_of(rows: Sequence[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
    return statistics.median(values) if values else math.nan


def orthogonality_rows(records: Sequence[dict], curves: Sequence[dict], best: Sequence[dict]) -> list[dict]:
    """Per (optimizer, combiner, setting) at its best learning rate (``best``, the protocol's
    rows), medians over the seeds:
    the workers' overall cosine and Adasum's scaling (1/2 = it averaged, 1 = it summed) at the
    first and the last evaluation, and the layers whose final scaling is lowest and highest."""
    by_run: dict[int, list[dict]] = {}
    for row in curves:
        if "orth/scale" in row:
            by_run.setdefault(row["run"], []).append(row)
    rows = []
    for key, indices in _best_runs(records, best).items():
        measured = [by_run[i] for i in indices if i in by_run]
        if not measured:
            continue  # one worker: nothing was combined
        firsts, lasts = [m[0] for m in measured], [m[-1] for m in measured]
        layers = {k[len("orth/layer/"):-len("/scale")]: _median_of(lasts, k)
                  for k in lasts[0] if k.startswith("orth/layer/") and k.endswith("/scale")}
        ranked = sorted((v, n) for n, v in layers.items() if not math.isnan(v))
        rows.append({**dict(zip(GROUP, key)), "lr": records[indices[0]]["lr"],
                     "cos first": _median_of(firsts, "orth/cos"), "cos last": _median_of(lasts, "orth/cos"),
                     "scale first": _median_of(firsts, "orth/scale"), "scale last": _median_of(lasts, "orth/scale"),
                     "most averaged layer": f"{ranked[0][1]} ({ranked[0][0]:.3g})" if ranked else "-",
                     "most summed layer": f"{ranked[-1][1]} ({ranked[-1][0]:.3g})" if ranked else "-"})
    return rows


def write_study_report(records: list[dict], curves: list[dict], out: Path, title: str, scale: Scale,
                       readings: Sequence[str] = ("tuned", "recipe")) -> list[Path]:
    """``runs.csv`` (one row per run), ``protocol.md`` (and ``protocol.csv``) of the tuned
    reading, a table per reading (``tuned.md``, ``recipe.md``), ``orthogonality.md``,
    ``elastic.md`` when the study changed worker counts, and the plots; returns the files
    written."""
    from adasum.lab.study_plots import plot_diagnostics, plot_steps  # matplotlib: reports only

    # Only the tuned reading's runs are tuned: the protocol's tables and plots are of those.
    tuned = [r for r in records if r["reading"] == "tuned"]
    best = best_per_setting(tuned, scale.sweep_seeds)
    write_csv(records, out / "runs.csv")
    write_csv(best, out / "protocol.csv")
    (out / "protocol.md").write_text(f"# {title}\n\n" + protocol_table(best))
    written = [out / "runs.csv", out / "protocol.csv", out / "protocol.md"]
    names = {r["combiner"] for r in records}
    # Every way of running Adasum against the paper's baseline, then the main one against each
    # ablation of the baseline (tuned reading only: an ablation has no recipe).
    pairs = {"tuned": [(c, BASELINE) for c in candidates(names)] + [(CANDIDATE, b) for b in ablations(names)],
             "recipe": [(c, BASELINE) for c in candidates(names)]}
    tables = {"tuned": lambda c, b: tuned_rows(records, scale.b_crit, scale.sweep_seeds, c, b),
              "recipe": lambda c, b: recipe_rows(records, c)}
    for name in readings:
        rows = [row for c, b in pairs[name] for row in tables[name](c, b)]
        fit = "\n" + baseline_fit_note(tuned, scale.b_crit, scale.sweep_seeds) if name == "tuned" else ""
        (out / f"{name}.md").write_text(f"# {title}: the {name} reading\n\n" + reading_table(rows) + fit)
        written.append(out / f"{name}.md")
    orth = orthogonality_rows(records, curves, best)
    if orth:
        note = ("\nMedians over the seeds at the best learning rate, from Adasum's statistics of the "
                "workers' reduced vectors (whatever the combiner): cosine between combined pairs, "
                "and Adasum's scaling of their sum (0.5 = averaged, 1 = summed, above 1 = the vectors pointed "
                "partly against each other: negative cosines).\n")
        (out / "orthogonality.md").write_text(f"# {title}\n\n" + markdown_table(orth, list(orth[0])) + note)
        written.append(out / "orthogonality.md")
    elastic = elastic_rows(tuned, scale.sweep_seeds)
    if elastic:
        (out / "elastic.md").write_text(f"# {title}\n\n" + elastic_table(elastic))
        written.append(out / "elastic.md")
    written.append(plot_steps(best, out / "steps_to_target.png", title))
    runs = _best_runs(records, best)
    if orth:
        written.append(plot_diagnostics(records, curves, runs, out / "orthogonality.png", title))
    return written
