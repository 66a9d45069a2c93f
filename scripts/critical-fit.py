"""The critical batch of a sweep of `adasum noise` runs (scripts/critical-sweep.sh), as the
tables of docs/results/critical_batch.md: steps to the target at every rate per E (seed 0, its
best in bold, and where the best sits at an end of the rates), the seeds at each best rate, the
fit S = S_min (1 + B_crit / E) of seed 0's best points and of the medians over seeds, with
bootstrap intervals over seeds; where several rates per E ran with 3 or more seeds, the fit at
the rate of the fewest median steps too.

    python scripts/critical-fit.py docs/results/critical_gpu/augdigits docs/results/critical_gpu/adam
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from adasum.lab.critical import best_median_rates, best_rates, fit_critical_batch, fit_over_seeds, median_steps, read_sweep


def _steps(value: int | None) -> str:
    return "-" if value is None else str(value)


def report(root: str) -> list[str]:
    runs = read_sweep(root)
    if not runs:
        return [f"{root}: no runs (no */summary.json)"]
    best = best_rates(runs)
    lines = [f"## {root}", "", "| E | rate: steps to the target, seed 0 (-: not reached in the budget) | budget |",
             "|---:|---|---:|"]
    for e in sorted({r["E"] for r in runs}):
        row = sorted((r for r in runs if r["E"] == e and r["seed"] == 0), key=lambda r: r["lr"])
        cells = [f"**{r['lr']:g}: {_steps(r['steps'])}**" if r["lr"] == best.get(e) else
                 f"{r['lr']:g}: {_steps(r['steps'])}" for r in row]
        edge = " (best at the lowest rate)" if row and best.get(e) == row[0]["lr"] else \
            " (best at the highest rate)" if row and best.get(e) == row[-1]["lr"] else ""
        lines.append(f"| {e:,} | {', '.join(cells)}{edge} | {row[0]['budget'] if row else ''} |")
    at_best: dict[int, list[dict]] = defaultdict(list)
    for r in runs:
        if best.get(r["E"]) == r["lr"]:
            at_best[r["E"]].append(r)
    lines += ["", "| E | best rate | steps per seed | median | B_simple at the target, median |", "|---:|---:|---|---:|---:|"]
    for e, rs in sorted(at_best.items()):
        rs.sort(key=lambda r: r["seed"])
        steps = [r["steps"] for r in rs]
        noises = [r["noise_scale"] for r in rs if r["steps"] is not None]
        noise = f"{statistics.median(noises):.0f}" if noises else "-"
        lines.append(f"| {e:,} | {best[e]:g} | {', '.join(_steps(s) for s in steps)} (seeds "
                     f"{', '.join(str(r['seed']) for r in rs)}) | {median_steps(steps):g} | {noise} |")
    seed0 = {e: next(r["steps"] for r in rs if r["seed"] == 0) for e, rs in at_best.items()}
    fit0 = fit_critical_batch(list(seed0), list(seed0.values()))
    lines += ["", f"Fit of seed 0's best points: S_min {fit0.s_min:.1f}, B_crit {fit0.b_crit:,.0f} "
              f"({100 * fit0.residual:.1f}% rms)."]
    if any(len(rs) > 1 for rs in at_best.values()):
        fit, b_ci, s_ci = fit_over_seeds({e: [r["steps"] for r in rs] for e, rs in at_best.items()})
        lines.append(f"Fit of the medians over seeds: S_min {fit.s_min:.1f} [{s_ci[0]:.1f}-{s_ci[1]:.1f}], "
                     f"B_crit {fit.b_crit:,.0f} [{b_ci[0]:,.0f}-{b_ci[1]:,.0f}] ({100 * fit.residual:.1f}% rms; "
                     "95% bootstrap intervals over seeds).")
    by_median = best_median_rates(runs)
    if by_median and by_median != {e: best[e] for e in by_median}:
        lines += ["", "Where several rates ran with 3 or more seeds, the rate of the fewest median steps per E "
                  "(seed 0's best is biased where runs are noisy):", "",
                  "| E | rate | steps per seed | median |", "|---:|---:|---|---:|"]
        chosen = {e: [r["steps"] for r in runs if r["E"] == e and r["lr"] == lr] for e, lr in by_median.items()}
        for e, steps in sorted(chosen.items()):
            lines.append(f"| {e:,} | {by_median[e]:g} | {', '.join(_steps(s) for s in steps)} | {median_steps(steps):g} |")
        fit, b_ci, s_ci = fit_over_seeds(chosen)
        lines.append(f"\nFit of those medians: S_min {fit.s_min:.1f} [{s_ci[0]:.1f}-{s_ci[1]:.1f}], "
                     f"B_crit {fit.b_crit:,.0f} [{b_ci[0]:,.0f}-{b_ci[1]:,.0f}] ({100 * fit.residual:.1f}% rms).")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="sweep directories: one run per subfolder, each with summary.json")
    for root in parser.parse_args().roots:
        print("\n".join(report(root)))


if __name__ == "__main__":
    main()
