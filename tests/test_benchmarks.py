"""The profiling script runs, and its table accounts for the time of the call it profiles."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


REFERENCE = SCRIPT.parent / "bench_reference.py"
#: A Python with Horovod built with MPI (../shared/anchors/install_horovod.sh); the side-by-side
#: run is skipped without one.
HOROVOD_PYTHON = Path(os.environ.get("HOROVOD_PYTHON", "/work/hvd/venv/bin/python"))


def test_reference_options() -> None:
    """bench_reference.py checks its options in the caller's Python, before any mpirun job:
    Horovod's Adasum takes only a power of two ranks."""
    done = subprocess.run([sys.executable, str(REFERENCE), "--worlds", "2,3"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--worlds 3: Horovod's Adasum needs a power of two ranks" in done.stderr, \
        done.stderr
    bad = subprocess.run([sys.executable, str(REFERENCE), "--exponents", "20,x"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "argument --exponents: 'x' is not an integer" in bad.stderr, bad.stderr
    shown = subprocess.run([sys.executable, str(REFERENCE), "--help"], capture_output=True, text=True, timeout=120,
                           check=True)
    for text in ("--horovod-python", "--worlds N,...", "(default 2,4)", "--exponents E,...", "(default 20,23)",
                 "--runs"):
        assert text in shown.stdout, shown.stdout


@pytest.mark.long  # about 5 s on an idle machine, 30 s or more on a loaded one: mpirun and Horovod's start
@pytest.mark.skipif(not HOROVOD_PYTHON.exists() or shutil.which("mpirun") is None,
                    reason="needs Horovod built with MPI (HOROVOD_PYTHON) and mpirun")
def test_reference_runs_against_horovod() -> None:
    """The smoke run under mpirun: every side timed, and real Horovod's Adasum gives the same
    float32 bits as adasum.all_reduce on 2 ranks (the last column counts the differing elements)."""
    done = subprocess.run([sys.executable, str(REFERENCE), "--quick", "--horovod-python", str(HOROVOD_PYTHON)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if re.match(r"\| 2 \| 2\^\d+ \|", line)]
    assert [r[1] for r in rows] == ["2^12", "2^16"], done.stdout
    for cells in rows:
        assert all(float(c) > 0 for c in cells[2:6]), done.stdout  # ms of the four sides
        assert cells[-1] == "0", done.stdout
