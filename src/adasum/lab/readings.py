"""The study's two readings of the paper's claims, each a table of verdicts with its evidence.

* The **recipe** reading fixes the hyperparameters as a user would: averaging follows its
  scaling rule (linear in E for momentum, with warm-up), Adasum keeps the one-worker rate. E*
  is averaging's largest E whose runs still reach the target (most seeds) in the budget; the
  claim is that Adasum still does at 2x, 4x and 8x E*.
* The **tuned** reading tunes both at every E (:mod:`adasum.lab.protocol`) and compares their
  steps to the target, paired by seed: where every seed of both reached the target, the
  difference in steps; otherwise the difference in final score.

A row's verdict comes from its outcomes (:func:`verdict`); a setting where nothing reached the
target is *untestable* at this scale, never evidence against the claim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from adasum.lab.bootstrap import median_ci, paired_difference_ci
from adasum.lab.protocol import best_lr, group_by_lr, steps_of
from adasum.lab.report import markdown_table

__all__ = ["verdict", "compare", "e_star", "tuned_rows", "recipe_rows", "reading_table", "candidates",
           "ablations", "CANDIDATE", "BASELINE", "RECIPE_MULTIPLES"]

#: The combiner the claims are about, and the paper's baseline. A section may compare more
#: than one way of running Adasum (e.g. ``adasum-delta``): each gets its own rows; and more than
#: one way of averaging (``average-...``, an ablation such as delta-mode averaging): the main
#: candidate gets tuned rows against each.
CANDIDATE, BASELINE = "adasum", "average"
#: The multiples of E* where the recipe reading tests Adasum.
RECIPE_MULTIPLES = (2, 4, 8)
UNTESTABLE = "untestable at this scale"


def candidates(combiners: Iterable[str]) -> list[str]:
    """The ways of running Adasum (every combiner not named for averaging), the main candidate
    first."""
    return sorted({c for c in combiners if not c.startswith(BASELINE)}, key=lambda c: (c != CANDIDATE, c))


def ablations(combiners: Iterable[str]) -> list[str]:
    """The other ways of averaging (``average-...``), each a baseline of the tuned reading only."""
    return sorted(c for c in combiners if c.startswith(BASELINE) and c != BASELINE)


def _claim(claim: str, candidate: str, baseline: str = BASELINE) -> str:
    """A claim about Adasum, naming the way it runs and the way averaging runs where those are
    not the main ones."""
    if candidate != CANDIDATE:
        claim = claim.replace("Adasum", f"Adasum ({candidate})", 1)
    return claim if baseline == BASELINE else claim.replace("averaging", f"averaging ({baseline})", 1)


def verdict(outcomes: Sequence[str]) -> str:
    """A claim's verdict from the outcomes of its settings (``better``: the claim held there,
    ``same`` or ``worse``: it did not, ``untestable``: nothing there reached the target). Only
    testable settings count: all held, ``reproduces``; some, ``partly``; none, ``does not``."""
    testable = [o for o in outcomes if o != "untestable"]
    if not testable:
        return UNTESTABLE
    held = sum(o == "better" for o in testable)
    return "reproduces" if held == len(testable) else "partly" if held else "does not"


def _reached(run: dict) -> bool:
    return math.isfinite(steps_of(run))


def _majority(runs: Sequence[dict]) -> bool:
    return sum(map(_reached, runs)) * 2 > len(runs)


def _score(run: dict) -> float:
    """The final score; a run that diverged scores nothing (its last score may be NaN, or
    from before it diverged)."""
    return 0.0 if run["diverged"] or not math.isfinite(run["score"]) else run["score"]


def _median_cell(name: str, runs: Sequence[dict], key: str) -> str:
    values = [steps_of(r) if key == "steps" else _score(r) for r in runs]
    if key == "steps" and not all(map(math.isfinite, values)):
        return f"{name} {sum(map(_reached, runs))}/{len(runs)} seeds reached"
    med, low, high = median_ci(values)
    return f"{name} {med:.4g} [{low:.4g}, {high:.4g}]"


def compare(candidate: Sequence[dict], baseline: Sequence[dict], seed: int = 0, name: str = CANDIDATE,
            baseline_name: str = BASELINE) -> dict:
    """Adasum's runs against the baseline's, paired by seed: ``outcome`` (``better``,
    ``same``, ``worse``, ``untestable``), ``metric`` and the ``evidence`` text (medians and
    the paired difference, each with its 95% bootstrap interval)."""
    mine, theirs = {r["seed"]: r for r in candidate}, {r["seed"]: r for r in baseline}
    seeds = sorted(mine.keys() & theirs.keys())
    a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
    if not any(map(_reached, a + b)):
        return {"outcome": "untestable", "metric": "-", "evidence": f"no combiner reached the target ({len(seeds)} seeds)"}
    metric = "steps" if all(map(_reached, a + b)) else "score"
    values = [[steps_of(r) if metric == "steps" else _score(r) for r in runs] for runs in (a, b)]
    diff, low, high = paired_difference_ci(*values, seed=seed)
    # The interval of Adasum's gain: fewer steps, or a higher final score.
    gain = sorted(-x if metric == "steps" else x for x in (low, high))
    outcome = "better" if gain[0] > 0 else "worse" if gain[1] < 0 else "same"
    counts = f"reached {sum(map(_reached, a))}/{len(a)} and {sum(map(_reached, b))}/{len(b)}"
    evidence = (f"{metric}: {_median_cell(name, a, metric)}, {_median_cell(baseline_name, b, metric)}; "
                f"paired difference {diff:.4g} [{low:.4g}, {high:.4g}]; {counts}")
    return {"outcome": outcome, "metric": metric, "evidence": evidence}


def _by_setting(records: Sequence[dict], combiner: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in records:
        if r["combiner"] == combiner and r["resize_to"] is None:
            runs.setdefault(r["setting"], []).append(r)
    return runs


def _row(claim: str, setting: str, reading: str, outcomes: Sequence[str] | None, evidence: str) -> dict:
    """A table row; ``outcomes`` None: a row of context (E*), no verdict of its own."""
    return {"claim": claim, "setting": setting, "reading": reading,
            "verdict": "-" if outcomes is None else verdict(outcomes), "evidence": evidence}


TUNED_CLAIM = "tuned at every E, Adasum needs fewer steps to the target than averaging"
RECIPE_CLAIM = ("at fixed hyperparameters (averaging: its scaling rule with warm-up; Adasum: the one-worker "
                "rate), Adasum reaches the target beyond averaging's largest E (E*)")


def tuned_rows(records: Sequence[dict], b_crit: float, sweep_seeds: Sequence[int],
               candidate: str = CANDIDATE, baseline: str = BASELINE) -> list[dict]:
    """One row per E (setting) at each combiner's best learning rate (judged on the sweep's
    seeds), ``candidate`` against ``baseline``, then the claim's row over the settings at or
    above ``b_crit`` (below it, both combiners should scale perfectly and tie)."""
    groups = group_by_lr([r for r in records if r["reading"] == "tuned" and r["resize_to"] is None])
    best = {key: by_lr[best_lr(by_lr, sweep_seeds)] for key, by_lr in groups.items()}
    rows, large = [], []
    mine = sorted((runs[0]["examples_per_step"], key) for key, runs in best.items() if key[1] == candidate)
    claim = _claim(TUNED_CLAIM, candidate, baseline)
    for examples, (optimizer, _, setting) in mine:
        a, b = best[(optimizer, candidate, setting)], best.get((optimizer, baseline, setting))
        if b is None:
            continue
        result = compare(a, b, name=candidate, baseline_name=baseline)
        lrs = f"lr {a[0]['lr']:g} vs {b[0]['lr']:g}; "
        below = ", below b_crit" if examples < b_crit else ""
        rows.append(_row(claim, f"E={examples} ({setting}{below})", "tuned", [result["outcome"]],
                         lrs + result["evidence"]))
        if examples >= b_crit:
            large.append(result["outcome"])
    rows.append(_row(claim, f"every E >= b_crit = {b_crit:g}", "tuned", large,
                     f"outcomes over {len(large)} settings: {', '.join(large) or 'none'}"))
    return rows


def e_star(records: Sequence[dict]) -> int | None:
    """Averaging's largest E whose recipe runs reached the target with most seeds (None: at
    no E)."""
    runs = _by_setting([r for r in records if r["reading"] == "recipe"], BASELINE)
    reached = [group[0]["examples_per_step"] for group in runs.values() if _majority(group)]
    return max(reached, default=None)


def _recipe_outcome(adasum: Sequence[dict], everything: Sequence[dict]) -> str:
    """At an E above E*: the claim held if Adasum reached the target with most seeds; it failed
    if anything else at that E (any combiner, any rate) did; else nothing there reaches it."""
    if adasum and _majority(adasum):
        return "better"
    return "worse" if any(map(_reached, everything)) else "untestable"


def _reach_cell(name: str, runs: Sequence[dict]) -> str:
    """How many seeds of ``runs`` (one setting) reached the target, at which rate, and their
    median steps where most did."""
    cell = f"{name} at E={runs[0]['examples_per_step']} ({runs[0]['setting']}), lr {runs[0]['lr']:g}: " \
           f"{sum(map(_reached, runs))}/{len(runs)} reached"
    if _majority(runs):
        med, low, high = median_ci([steps_of(r) for r in runs])
        cell += f", median steps {med:.4g} [{low:.4g}, {high:.4g}]" if math.isfinite(high) else f", median steps {med:.4g}"
    return cell


def recipe_rows(records: Sequence[dict], candidate: str = CANDIDATE) -> list[dict]:
    """E* (with averaging's runs at every E and Adasum's at E*), then one row per setting at a
    multiple of E* (:data:`RECIPE_MULTIPLES`), then the claim's row."""
    star = e_star(records)
    recipe = [r for r in records if r["reading"] == "recipe"]
    averaged, adasum = _by_setting(recipe, BASELINE), _by_setting(recipe, candidate)
    claim = _claim(RECIPE_CLAIM, candidate)
    by_e = sorted(averaged.values(), key=lambda g: (g[0]["examples_per_step"], g[0]["setting"]))
    context = "; ".join(_reach_cell(BASELINE, g) for g in by_e) or "averaging not run"
    if star is None:
        return [_row(claim, "E*", "recipe", ["untestable"], f"averaging reached the target at no E: {context}")]
    at_star = [_reach_cell(candidate, g) for g in adasum.values() if g[0]["examples_per_step"] == star]
    rows = [_row(claim, f"E* = {star}", "recipe", None, "; ".join([context, *at_star]))]
    outcomes = []
    for m in RECIPE_MULTIPLES:
        examples = star * m
        mine = [g for g in adasum.values() if g[0]["examples_per_step"] == examples]
        there = [r for r in records if r["examples_per_step"] == examples and r["resize_to"] is None]
        if not there:
            outcomes.append("untestable")
            rows.append(_row(claim, f"E = {m} x E* = {examples}", "recipe", ["untestable"],
                             f"E = {examples} is beyond the grid"))
        for group in mine:
            outcome = _recipe_outcome(group, there)
            outcomes.append(outcome)
            rows.append(_row(claim, f"E = {m} x E* = {examples} ({group[0]['setting']})", "recipe",
                             [outcome], _reach_cell(candidate, group)))
    rows.append(_row(claim, f"{', '.join(map(str, RECIPE_MULTIPLES))} x E*", "recipe", outcomes,
                     f"outcomes: {', '.join(outcomes)}"))
    return rows


_COLUMNS = ("claim", "setting", "reading", "verdict", "evidence")


def reading_table(rows: Sequence[dict]) -> str:
    """A reading's rows as markdown, with what the evidence means."""
    note = ("\nEvidence: medians over seeds with 95% bootstrap intervals [low, high]; the paired "
            "difference is Adasum minus averaging over the seeds both ran (steps where every run "
            "reached the target, else final score). A verdict counts testable settings only: a "
            "setting where nothing reached the target is untestable at this scale.\n")
    return markdown_table(rows, _COLUMNS) + note
