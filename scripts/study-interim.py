"""The tuned reading of a study section that has not finished, from the runs it has stored.

    .venv/bin/python scripts/study-interim.py adam docs/results/study/adam-cpu [--scale cpu] [--all]

Walks the section's plan over the stored runs (`adasum.lab.study.stored_runs`; nothing is run)
and prints the tuned reading's table over the E whose learning-rate sweep is complete, with the
seeds stored so far at the best rates (the sweep's two, until the plan's later rounds add more);
with --all, every E with the rates swept so far; then the critical batch the averaging
baseline's runs read so far imply (`adasum.lab.study_report.baseline_fit_note`). An interim
table, not a verdict.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from adasum.lab.readings import reading_table, tuned_rows
from adasum.lab.sections import SECTIONS
from adasum.lab.study import stored_runs
from adasum.lab.study_report import baseline_fit_note
from adasum.lab.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(SECTIONS))
    parser.add_argument("out", type=Path, help="the section's --out folder")
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--all", action="store_true",
                        help="read every E, also those whose sweep is unfinished (its best rate may move)")
    args = parser.parse_args()
    section = SECTIONS[args.name]
    scale = section.scale(args.scale)
    train_size = load_task(section.task_at(scale), None, scale.samples).train_size
    records, unfinished = stored_runs(section, scale, args.out, train_size)
    # An E whose sweep lacks runs stays out unless asked for: its best rate may yet move.
    read = [r for r in records if args.all or r["setting"] not in unfinished]
    print(f"{args.name} ({args.scale}): {len(records)} runs stored; sweep runs missing: {dict(unfinished) or 'none'}")
    print("runs per E and combiner, at the E read below:",
          dict(sorted(Counter((r["examples_per_step"], r["combiner"]) for r in read).items())))
    print()
    print(reading_table(tuned_rows(read, scale.b_crit, scale.sweep_seeds)))
    print(baseline_fit_note([r for r in read if r["reading"] == "tuned"], scale.b_crit, scale.sweep_seeds))


if __name__ == "__main__":
    main()
