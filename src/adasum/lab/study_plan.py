"""Which runs a study still needs, given the runs it has: the study is a loop that asks
:func:`next_points`, runs what it gets, and asks again until it gets nothing. The plan depends
only on the finished runs, so a resumed study plans exactly what the uninterrupted one would.

The tuned reading, per setting, in this order:

1. every learning rate of the axis, for every combiner, with the sweep's seeds;
2. while a combiner's best rate (on the sweep's seeds) sits at an end of the axis, one more 2x
   step beyond that end, for every combiner (one axis, the same range for all), at most
   ``max_widen`` steps beyond the section's first axis;
3. the remaining seeds at each combiner's best rate and its two neighbours on the axis.

An elastic setting's axis also holds every rate its constant twin tried, and step 3 also runs
every seed at the twin's best rate, where the elastic table resumes (:func:`_twin_bests`).

The recipe reading: averaging at its recipe rate at every E, then Adasum at its recipe rate at
E* and the multiples the reading tests (:mod:`adasum.lab.readings`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from adasum.lab.protocol import best_lr
from adasum.lab.readings import BASELINE, RECIPE_MULTIPLES, candidates, e_star
from adasum.lab.sections import Batching, Scale, Section, recipe_lr

__all__ = ["Point", "next_points", "widen", "neighbourhood", "rounded"]


@dataclass(frozen=True)
class Point:
    """One run the study needs."""

    reading: str
    combiner: str
    setting: Batching
    lr: float
    seed: int


def rounded(lr: float) -> float:
    """A learning rate as runs are named and compared by: six significant digits."""
    return float(f"{lr:.6g}")


def widen(axis: Sequence[float], bests: Collection[float], first: Sequence[float], max_widen: int) -> list[float]:
    """The rates to add to ``axis``: a 2x step beyond each end that one of ``bests`` sits at,
    unless that end is already ``max_widen`` steps beyond the ``first`` axis's."""
    low, high = min(axis), max(axis)
    added = []
    if low in bests and math.log2(min(first) / low) < max_widen - 0.5:
        added.append(rounded(low / 2))
    if high in bests and math.log2(high / max(first)) < max_widen - 0.5:
        added.append(rounded(high * 2))
    return added


def neighbourhood(axis: Sequence[float], lr: float) -> list[float]:
    """``lr`` and its neighbours on the sorted ``axis``."""
    i = axis.index(lr)
    return list(axis[max(0, i - 1):i + 2])


def _missing(reading: str, combiners: Sequence[str], setting: Batching, lrs: Sequence[float],
             seeds: Sequence[int], done: set[tuple]) -> list[Point]:
    return [Point(reading, c, setting, lr, s) for c in combiners for lr in lrs for s in seeds
            if (reading, c, setting.label, lr, s) not in done]


def _twin_runs(setting: Batching, tuned: Sequence[dict]) -> list[dict]:
    """The runs of an elastic setting's constant twin (the same workers, never changed); none
    for a setting that does not change."""
    if setting.resize_to is None:
        return []
    twin = Batching(setting.workers, setting.batch, setting.accum).label
    return [r for r in tuned if r["setting"] == twin]


def _twin_bests(setting: Batching, tuned: Sequence[dict], seeds: Sequence[int]) -> dict[str, float]:
    """Per combiner, the twin's best rate on ``seeds``: where the elastic table resumes (what a
    user who does not retune gets), so the elastic setting runs every seed there too."""
    by_combiner: dict[str, dict[float, list[dict]]] = {}
    for r in _twin_runs(setting, tuned):
        by_combiner.setdefault(r["combiner"], {}).setdefault(r["lr"], []).append(r)
    return {c: best_lr(by_lr, seeds) for c, by_lr in by_combiner.items()}


def _tuned(section: Section, scale: Scale, setting: Batching, tuned: Sequence[dict], done: set[tuple]) -> list[Point]:
    """The tuned reading's next runs at one setting (see the module's description)."""
    combiners = list(section.combiners)
    runs = [r for r in tuned if r["setting"] == setting.label]
    # An elastic setting tries every rate its twin tried, so the twin's best is among its own.
    axis = sorted({*map(rounded, scale.lrs), *(r["lr"] for r in runs), *(r["lr"] for r in _twin_runs(setting, tuned))})
    missing = _missing("tuned", combiners, setting, axis, scale.sweep_seeds, done)
    if missing:
        return missing
    by_combiner: dict[str, dict[float, list[dict]]] = {}
    for r in runs:
        by_combiner.setdefault(r["combiner"], {}).setdefault(r["lr"], []).append(r)
    bests = {c: best_lr(by_combiner[c], scale.sweep_seeds) for c in combiners}
    added = widen(axis, set(bests.values()), list(map(rounded, scale.lrs)), scale.max_widen)
    if added:
        return _missing("tuned", combiners, setting, added, scale.sweep_seeds, done)
    resumed = _twin_bests(setting, tuned, scale.sweep_seeds)

    def seeded(c: str) -> list[float]:
        return sorted({*neighbourhood(axis, bests[c]), *([resumed[c]] if c in resumed else [])})

    return [p for c in combiners for p in _missing("tuned", [c], setting, seeded(c), scale.seeds, done)]


def _recipe(section: Section, scale: Scale, records: Sequence[dict], done: set[tuple]) -> list[Point]:
    """The recipe reading's next runs: averaging everywhere first, then Adasum where E* says."""
    settings = [s for s in scale.settings if s.resize_to is None]

    def points(combiner: str, chosen: Sequence[Batching]) -> list[Point]:
        rule = section.combiners[combiner].rule
        return [p for s in chosen for p in _missing(
            "recipe", [combiner], s, [rounded(recipe_lr(rule, scale.base_lr, s, scale.reference))], scale.seeds, done)]

    missing = points(BASELINE, settings)
    if missing:
        return missing
    star = e_star(records)
    if star is None:
        return []
    wanted = {star * m for m in (1, *RECIPE_MULTIPLES)}
    return [p for c in candidates(section.combiners) for p in points(c, [s for s in settings if s.examples in wanted])]


def next_points(section: Section, scale: Scale, records: Sequence[dict]) -> list[Point]:
    """The runs to make next (none: the study is complete)."""
    done = {(r["reading"], r["combiner"], r["setting"], r["lr"], r["seed"]) for r in records}
    tuned = [r for r in records if r["reading"] == "tuned"]
    points = [p for s in scale.settings for p in _tuned(section, scale, s, tuned, done)]
    if "recipe" in section.readings:
        points += _recipe(section, scale, records, done)
    return points
