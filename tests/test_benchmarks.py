"""The profiling script runs, and its table accounts for the time of the call it profiles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_collective.py"


def _tables(out: str) -> dict[int, dict[str, float]]:
    """Rank 0's milliseconds per row, per world size, from the printed markdown tables."""
    tables: dict[int, dict[str, float]] = {}
    rows: dict[str, float] = {}
    for line in out.splitlines():
        head = re.match(r"(\d+) ranks, ", line)
        if head:
            rows = tables.setdefault(int(head.group(1)), {})
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| ") and len(cells) == 5 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0].removeprefix("| ").strip("*")] = float(cells[1])
    return tables


def test_profile_accounts_for_the_call() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120, check=True
    )
    tables = _tables(done.stdout)
    assert sorted(tables) == [2, 3], done.stdout
    for world, rows in tables.items():
        call, summed = rows["call, instrumented"], rows["sum of the phases, median over repetitions"]
        # In every repetition the phases add up to the instrumented call, less the timer's overhead.
        assert 0.5 * call <= summed <= 1.5 * call, (world, done.stdout)
        # The wrappers took hold: the named phases, not the remainder, hold most of the time.
        assert rows["other (dispatch, plan, buffers, slicing)"] < 0.5 * call, done.stdout
        assert rows["reduce-scatter L1 exchange"] > 0 and rows["all-gather L1 exchange"] > 0
        assert rows["dist.all_reduce SUM"] > 0
    # Three ranks fold one pair: its exchange, arithmetic and the way back are timed.
    assert {"fold exchange", "fold combination", "unfold exchange"} <= set(tables[3]), done.stdout


def test_lists_are_comma_separated() -> None:
    """The benchmarks take lists as the ``adasum`` program does (``--worlds 2,4``), and a bad item
    is named before any worker starts."""
    bench = SCRIPT.parent / "bench_collective.py"
    done = subprocess.run([sys.executable, str(bench), "--worlds", "2,x"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "argument --worlds: 'x' is not an integer" in done.stderr, done.stderr
    shown = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True, timeout=120, check=True)
    assert "--worlds N,..." in shown.stdout and "(default 2,3,4)" in shown.stdout, shown.stdout
