"""The tuned reading of a study section that has not finished, from the runs it has stored.

    .venv/bin/python scripts/study-interim.py adam docs/results/study/adam-cpu [--scale cpu]

Walks the section's plan as `adasum study` does, taking every run whose file is there (nothing is
run), and prints the tuned reading's table over the E whose learning-rate sweep is complete,
with the seeds stored so far at the best rates (the sweep's two, until the plan's later rounds
add more); with --all, every E with the rates swept so far. An interim table, not a verdict.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from adasum.lab.readings import reading_table, tuned_rows
from adasum.lab.sections import SECTIONS
from adasum.lab.study import _load, _record, run_spec
from adasum.lab.study_plan import next_points
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
    records: list[dict] = []
    asked: set = set()
    unfinished: Counter = Counter()  # per E (setting label): sweep runs asked for, not stored
    while points := [p for p in next_points(section, scale, records) if p not in asked]:
        stored_any = False
        for point in points:
            asked.add(point)
            spec = run_spec(section, scale, point, train_size)
            stored = _load(args.out / "runs" / f"{spec.key}.json", spec)
            if stored is None:
                unfinished[spec.setting.label] += point.seed in scale.sweep_seeds
            else:
                records.append(_record(spec, stored["summary"], train_size))
                stored_any = True
        if not stored_any:
            break
    # An E whose sweep lacks runs stays out of the table: none is read from a half-swept axis.
    complete = [r for r in records if args.all or not unfinished[r["setting"]]]
    print(f"{args.name} ({args.scale}): {len(records)} runs stored; sweep runs missing: "
          f"{ {k: v for k, v in unfinished.items() if v} or 'none'}")
    print("runs per E and combiner, at the E read below:",
          dict(sorted(Counter((r["examples_per_step"], r["combiner"]) for r in complete).items())))
    print()
    print(reading_table(tuned_rows(complete, scale.b_crit, scale.sweep_seeds)))


if __name__ == "__main__":
    main()
