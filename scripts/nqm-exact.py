"""The known answers behind the `nqm` critical-batch sweep (scripts/critical-sweep.sh), at its E
and constant rates: per E, the fewest expected steps to the target (the expected score's
crossing, exact) and the median steps of 1,000 runs drawn directly under the study's crossing
rule (two consecutive steps at the target), each with its best rate, and the fit
S = S_min (1 + B_crit / E) of each. Compare with
`python scripts/critical-fit.py docs/results/critical_cpu/nqm`; the tables are in
docs/results/critical_batch.md.

Then the same exact fit under the `nqm` study section's own schedule (warm-up, then cosine decay
over one sample budget for every E), at the section's E and averaging's rates: the critical
batch the section's runs measure (its `tuned.md` ends with their fit) is of that schedule, not
of a constant rate.

    python scripts/nqm-exact.py [--target 0.98]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from adasum.lab.config import Steps
from adasum.lab.critical import fit_critical_batch, median_steps
from adasum.lab.optimizers import MOMENTUM
from adasum.lab.quadratic import b_simple, expected_critical, expected_moments, expected_scores, sampled_crossings
from adasum.lab.sections import SECTIONS
from adasum.lab.study import run_spec
from adasum.lab.study_plan import Point

#: The sweep's E and rates (sqrt(2) apart, 0.0125-0.8) and its budgets.
EXAMPLES = (8, 32, 128, 512, 2048)
RATES = tuple(0.0125 * 2 ** (k / 2) for k in range(13))
HORIZON = 1024


def _sampled_best(target: float, e: int) -> tuple[float, float, np.ndarray]:
    """(median steps, rate, the runs' steps) at the rate of the fewest median steps."""
    best = None
    for lr in RATES:
        steps = sampled_crossings(target, e, lr, MOMENTUM, horizon=HORIZON)
        median = median_steps([s if s >= 0 else None for s in steps])
        if best is None or median < best[0]:
            best = (median, lr, steps)
    assert best is not None
    return best


def _first_step(scores: np.ndarray, target: float) -> int | None:
    reached = np.nonzero(scores >= target)[0]
    return int(reached[0]) + 1 if len(reached) else None


def section_schedule() -> None:
    """The expected steps to the `nqm` section's target at each of its E, over a fine rate axis,
    with the section's schedule for averaging's runs (:func:`adasum.lab.study.run_spec`) and with
    a constant rate over the same steps; the fits of both, over every E and over the E whose
    scheduled crossing comes after the warm-up (as the section's own fit takes them)."""
    section = SECTIONS["nqm"]
    scale = section.scale("cpu")
    rates = [0.0125 * 2 ** (k / 4) for k in range(30)]
    print(f"\n`nqm` section's schedule (target {scale.target}): per E, the best rate's expected steps\n"
          "| E | warm-up steps | warm-up and cosine: rate, steps | constant: rate, steps |\n|---:|---:|---|---|")
    points: dict[str, list[tuple[int, int, bool]]] = {"schedule": [], "constant": []}
    for setting in scale.settings:
        found: dict[str, list[tuple[int, float]]] = {"schedule": [], "constant": []}
        for lr in rates:
            spec = run_spec(section, scale, Point("tuned", "average", setting, lr, 0), scale.samples)
            plan = Steps(spec.config, setting.workers, scale.samples)
            for name, course in (("schedule", [plan.lr_at(t) for t in range(plan.total_steps)]),
                                 ("constant", [lr] * plan.total_steps)):
                if (steps := _first_step(expected_scores(course, setting.examples, MOMENTUM), scale.target)) is not None:
                    found[name].append((steps, lr))
        warmup = spec.config.warmup  # the setting's, whatever the rate
        cells = []
        for name in points:
            steps, lr = min(found[name])
            points[name].append((setting.examples, steps, min(found["schedule"])[0] > warmup))
            cells.append(f"{lr:.3g}, {steps}")
        print(f"| {setting.examples:,} | {warmup} | {' | '.join(cells)} |")
    for name, rows in points.items():
        past = [r for r in rows if r[2]]
        for label, chosen in (("every E", rows), ("the E whose scheduled crossing is past the warm-up", past)):
            fit = fit_critical_batch([r[0] for r in chosen], [r[1] for r in chosen])
            print(f"Fit, {name}, {label} ({', '.join(f'{r[0]:,}' for r in chosen)}): S_min {fit.s_min:.1f}, "
                  f"B_crit {fit.b_crit:.0f} ({100 * fit.residual:.1f}% rms).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.98)
    target = parser.parse_args().target
    expected = expected_critical(target, EXAMPLES, RATES, MOMENTUM, horizon=HORIZON)
    print("| E | expected: best rate, steps, B_simple at E(theta^2) there | 1,000 drawn runs: best rate, "
          "median steps [10th-90th percentile], reached |\n|---:|---|---|")
    sampled = []
    for e, steps, lr in expected:
        second = expected_moments([lr] * steps, e, MOMENTUM)
        median, best, runs = _sampled_best(target, e)
        sampled.append((e, median))
        reached = runs[runs >= 0]
        low, high = np.percentile(reached, [10, 90]) if len(reached) else (np.nan, np.nan)
        print(f"| {e:,} | {lr:.3g}, {steps}, {b_simple(torch.from_numpy(second).sqrt()):.0f} | {best:.3g}, {median:g} "
              f"[{low:.0f}-{high:.0f}], {len(reached)}/{len(runs)} |")
    for name, points in (("expected course", [(e, s) for e, s, _ in expected]), ("drawn runs' medians", sampled)):
        fit = fit_critical_batch([p[0] for p in points], [p[1] for p in points])
        print(f"\nFit of the {name}: S_min {fit.s_min:.1f}, B_crit {fit.b_crit:.0f} ({100 * fit.residual:.1f}% rms).")
    section_schedule()


if __name__ == "__main__":
    main()
