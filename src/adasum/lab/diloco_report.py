"""The readings of ``adasum study diloco`` (:mod:`adasum.lab.diloco`): three questions, each
with a verdict, and the tables behind them.

1. **Does Adasum at one outer rate match averaging tuned per (N, H), at the same number of
   synchronisations?** Per setting, Adasum's runs at its one rate against averaging's at its best
   rate, paired by seed: the difference of final test loss (Adasum minus averaging) with its 95%
   bootstrap interval. Adasum matches unless the interval lies wholly above 0 (``worse``); an
   interval wholly below 0 is ``better``. With 5 seeds a small gap can hide in the interval,
   which the evidence prints.
2. **Does one outer rate serve every N with Adasum but not with averaging?** Per H, each
   combiner's one rate (Adasum's for all settings; averaging's common rate over the N of that H,
   an easier test for averaging) serves at an N when its runs are not worse, as in question 1,
   than averaging tuned at that (N, H). The claim holds at an H (``better``) where Adasum's rate
   serves every N and averaging's fails at one; ``same`` where both serve every N; ``worse``
   where Adasum's fails at one.
3. **How orthogonal are the deltas as H grows?** Adasum's statistics of the deltas it combined
   (cosine between combined pairs, its scaling of their sum: 1/2 averaged, 1 summed), per layer,
   at Adasum's one rate, averaged over each run's evaluations. The claim tested is that the
   deltas grow more parallel as H grows: at each N, for each step of H, the paired difference of
   the scaling (larger H minus smaller) lies below 0 (``better``).

A diverged run's loss is infinite; where any run of a comparison diverged it is made on the
final score (accuracy, a diverged run scoring 0) instead.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from adasum.lab.bootstrap import median_ci, paired_difference_ci
from adasum.lab.diloco import BASELINE, CANDIDATE, LocalScale, best_rate, by_setting, common_rate, loss_of
from adasum.lab.readings import verdict
from adasum.lab.records import write_csv
from adasum.lab.report import markdown_table

__all__ = ["compare_runs", "match_rows", "one_rate_rows", "orthogonality_rows", "rate_rows", "write_local_report"]

_Q1 = "Adasum at one outer rate matches averaging tuned per (N, H) at the same H"
_Q2 = "one outer rate serves every N with Adasum but not with averaging"
_Q3 = "the deltas grow more parallel as H grows (Adasum's scaling falls toward 1/2)"


def _score(run: dict) -> float:
    return 0.0 if run["diverged"] or not math.isfinite(run["score"]) else run["score"]


def compare_runs(candidate: Sequence[dict], baseline: Sequence[dict], seed: int = 0) -> dict:
    """``candidate`` against ``baseline`` paired by seed: ``outcome`` (``better``: lower loss,
    ``same``, ``worse``) and the ``evidence`` (medians, paired difference, 95% intervals)."""
    mine, theirs = {r["seed"]: r for r in candidate}, {r["seed"]: r for r in baseline}
    seeds = sorted(mine.keys() & theirs.keys())
    a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
    by_loss = all(math.isfinite(loss_of(r)) for r in a + b)
    metric = "loss" if by_loss else "score"
    values = [[loss_of(r) if by_loss else _score(r) for r in runs] for runs in (a, b)]
    diff, low, high = paired_difference_ci(*values, seed=seed)
    gain = sorted(-x if by_loss else x for x in (low, high))  # the interval of the candidate's gain
    outcome = "better" if gain[0] > 0 else "worse" if gain[1] < 0 else "same"
    medians = [median_ci(v) for v in values]
    evidence = (f"{metric}: {medians[0][0]:.4g} [{medians[0][1]:.4g}, {medians[0][2]:.4g}] vs "
                f"{medians[1][0]:.4g} [{medians[1][1]:.4g}, {medians[1][2]:.4g}]; paired difference "
                f"{diff:.3g} [{low:.3g}, {high:.3g}] over {len(seeds)} seeds")
    return {"outcome": outcome, "evidence": evidence}


def _serves(outcome: str) -> bool:
    return outcome != "worse"


def _chosen(scale: LocalScale, records: Sequence[dict]) -> dict:
    """The rates the readings use: Adasum's one rate, averaging's best per setting and its
    common rate per H (all judged on the sweep's seeds), and both combiners' runs."""
    runs = {c: by_setting(records, c) for c in (CANDIDATE, BASELINE)}
    average, seeds = runs[BASELINE], scale.sweep_seeds
    per_h = {h: common_rate({s.label: average[s.label] for s in scale.settings if s.sync_every == h}, seeds)
             for h in scale.sync_every}
    return {"runs": runs, "one": common_rate(runs[CANDIDATE], seeds), "per_h": per_h,
            "best": {s.label: best_rate(average[s.label], seeds) for s in scale.settings}}


def _row(question: str, setting: str, outcomes: Sequence[str], evidence: str) -> dict:
    return {"question": question, "setting": setting, "verdict": verdict(outcomes), "evidence": evidence}


def match_rows(records: Sequence[dict], scale: LocalScale) -> list[dict]:
    """Question 1: one row per setting, then the question's row."""
    c = _chosen(scale, records)
    rows, held = [], []
    for s in scale.settings:
        best = c["best"][s.label]
        result = compare_runs(c["runs"][CANDIDATE][s.label][c["one"]], c["runs"][BASELINE][s.label][best])
        held.append("better" if _serves(result["outcome"]) else "worse")
        rows.append(_row(_Q1, s.label, held[-1:], f"{result['outcome']}; outer lr {c['one']:g} vs {best:g}; "
                         + result["evidence"]))
    rows.append(_row(_Q1, "every (N, H)", held, f"matched at {held.count('better')} of {len(held)} settings"))
    return rows


def one_rate_rows(records: Sequence[dict], scale: LocalScale) -> list[dict]:
    """Question 2: one row per H, then the question's row."""
    c = _chosen(scale, records)
    rows, outcomes = [], []
    for h in scale.sync_every:
        cells, adasum_serves, average_serves = [], True, True
        for s in (s for s in scale.settings if s.sync_every == h):
            tuned = c["runs"][BASELINE][s.label][c["best"][s.label]]
            mine = compare_runs(c["runs"][CANDIDATE][s.label][c["one"]], tuned)["outcome"]
            theirs = compare_runs(c["runs"][BASELINE][s.label][c["per_h"][h]], tuned)["outcome"]
            adasum_serves &= _serves(mine)
            average_serves &= _serves(theirs)
            cells.append(f"N{s.workers}: Adasum {mine}, averaging {theirs}")
        outcome = "worse" if not adasum_serves else "same" if average_serves else "better"
        outcomes.append(outcome)
        rows.append(_row(_Q2, f"H={h}", [outcome], f"{outcome}; against averaging tuned at each N, Adasum at "
                         f"{c['one']:g}, averaging at {c['per_h'][h]:g}: " + "; ".join(cells)))
    rows.append(_row(_Q2, "every H", outcomes, f"outcomes: {', '.join(outcomes)}"))
    return rows


def _run_means(curves: Sequence[dict], index: int) -> dict[str, float]:
    """One run's Adasum statistics (``orth/...``), each averaged over its evaluations."""
    rows = [r for r in curves if r["run"] == index and "orth/scale" in r]
    keys = [k for k in rows[0] if k.startswith("orth/")] if rows else []
    return {k: statistics.fmean(r[k] for r in rows) for k in keys}


def _median_cell(values: Sequence[float]) -> str:
    med, low, high = median_ci(values)
    return f"{med:.3f} [{low:.3f}, {high:.3f}]"


def orthogonality_rows(records: Sequence[dict], curves: Sequence[dict], scale: LocalScale) -> tuple[list[dict], list[dict]]:
    """Question 3: the table (per setting, Adasum at its one rate: medians over seeds of the
    cosine and the scaling, overall and per layer) and the question's rows."""
    one = _chosen(scale, records)["one"]
    means: dict[str, dict[int, dict[str, float]]] = {}
    for i, r in enumerate(records):
        if r["combiner"] == CANDIDATE and r["lr"] == one:
            means.setdefault(r["setting"], {})[r["seed"]] = _run_means(curves, i)
    table = []
    for s in scale.settings:
        runs = [m for m in means.get(s.label, {}).values() if m]
        if not runs:
            continue
        layers = sorted(k for k in runs[0] if k.startswith("orth/layer/") and k.endswith("/scale"))
        table.append({"N": s.workers, "H": s.sync_every, "seeds": len(runs),
                      "cos": _median_cell([m["orth/cos"] for m in runs]),
                      "scale": _median_cell([m["orth/scale"] for m in runs]),
                      **{k[len("orth/layer/"):]: f"{statistics.median(m[k] for m in runs):.3f}" for k in layers}})
    rows, outcomes = [], []
    for n in scale.workers:
        hs = sorted(scale.sync_every)
        for low_h, high_h in zip(hs, hs[1:]):
            a, b = (means.get(f"N{n} b{scale.batch} H{h}", {}) for h in (high_h, low_h))
            seeds = sorted(s for s in a.keys() & b.keys() if a[s] and b[s])
            if not seeds:
                continue
            diff, lo, hi = paired_difference_ci([a[s]["orth/scale"] for s in seeds], [b[s]["orth/scale"] for s in seeds])
            outcomes.append("better" if hi < 0 else "worse" if lo > 0 else "same")
            rows.append(_row(_Q3, f"N{n}, H {low_h} -> {high_h}", outcomes[-1:],
                             f"{outcomes[-1]}; scaling difference {diff:.3g} [{lo:.3g}, {hi:.3g}] over {len(seeds)} seeds"))
    rows.append(_row(_Q3, "every N and step of H", outcomes, f"outcomes: {', '.join(outcomes) or 'none'}"))
    return table, rows


def rate_rows(records: Sequence[dict], scale: LocalScale) -> list[dict]:
    """Per setting: each combiner's best outer rate on the sweep's seeds, the rates the readings
    use, and the median final loss at each."""
    c = _chosen(scale, records)
    rows = []
    for s in scale.settings:
        mine, theirs = c["runs"][CANDIDATE][s.label], c["runs"][BASELINE][s.label]
        own = best_rate(mine, scale.sweep_seeds)

        def cell(runs: dict[float, list[dict]], lr: float) -> str:
            return f"{lr:g}: {statistics.median(map(loss_of, runs[lr])):.4g} ({len(runs[lr])} seeds)"

        rows.append({"N": s.workers, "H": s.sync_every, "syncs": scale.budget // s.sync_every,
                     "averaging best": cell(theirs, c["best"][s.label]),
                     "averaging per-H rate": cell(theirs, c["per_h"][s.sync_every]),
                     "Adasum one rate": cell(mine, c["one"]), "Adasum own best (sweep)": cell(mine, own),
                     "rates tried": len(theirs)})
    return rows


_NOTE = ("\nOuter rates and median final test loss (cross-entropy) over the seeds run there. Averaging's "
         "outer rate is tuned per (N, H) on the axis (best median loss over the sweep's seeds); Adasum uses one "
         "outer rate everywhere, the rate every setting ran with the smallest worst relative excess of "
         "median loss over that setting's best, chosen once from Adasum's sweep. Evidence: medians with 95% "
         "bootstrap intervals; paired differences are the first named minus the second, by seed.\n")


def write_local_report(records: list[dict], curves: list[dict], out: Path, title: str,
                       scale: LocalScale) -> list[Path]:
    """``runs.csv``, ``rates.md``, ``diloco.md`` (the three questions' verdicts) and
    ``orthogonality.md``; returns the files written."""
    write_csv(records, out / "runs.csv")
    rates = rate_rows(records, scale)
    (out / "rates.md").write_text(f"# {title}: outer rates\n\n" + markdown_table(rates, list(rates[0])) + _NOTE)
    table, orth = orthogonality_rows(records, curves, scale)
    questions = match_rows(records, scale) + one_rate_rows(records, scale) + orth
    (out / "diloco.md").write_text(f"# {title}\n\n" + markdown_table(questions, ("question", "setting", "verdict", "evidence"))
                                   + _NOTE)
    columns = list(table[0]) if table else ["N", "H"]
    (out / "orthogonality.md").write_text(
        f"# {title}: the deltas\n\n" + markdown_table(table, columns)
        + "\nAdasum at its one outer rate, medians over seeds [95% bootstrap interval] of each run's mean over its "
          "evaluations (each the last synchronisation's deltas): cosine between combined pairs, Adasum's scaling "
          "of their sum (0.5 = averaged, 1 = summed), and per layer the scaling.\n")
    return [out / "runs.csv", out / "rates.md", out / "diloco.md", out / "orthogonality.md"]
