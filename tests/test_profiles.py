"""The profiling scripts of benchmarks/ run, print well-formed tables, and their phases account
for the time of what they profile."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"[-+]?\d+\.\d+"


def _run(script: str) -> str:
    # --quick takes about 20 s on two shared cores; the limit leaves room for a loaded machine.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_profile_training_accounts_for_the_step() -> None:
    out = _run("profile_training.py")
    tables = re.findall(r"^(\S+) against (\S+) \(.*\)\n((?:\|.*\n)+)(?:\(.*\n)?=> \1: ", out, re.M)
    assert [(a, b) for a, b, _ in tables] == [
        ("ddp-adasum", "ddp-mean"), ("delta-adam", "ddp-adam"), ("delta-adam-overlap", "ddp-adam"),
    ], out
    for name, base, body in tables:
        lines = body.splitlines()
        assert _cells(lines[0]) == ["phase", f"{base} ms", "%", "thread CPU ms", f"{name} ms", "%", "thread CPU ms",
                                    "extra ms"]
        # Each row's path: its label's indentation gives its depth in the tree of phases.
        values: dict[tuple[str, ...], tuple[float | None, float | None]] = {}
        path: list[str] = []
        for line in lines[2:]:
            label = line[2 : line.index(" | ")]
            depth = (len(label) - len(label.lstrip())) // 2
            path = path[:depth] + [label.strip()]
            cells = _cells(line)
            assert len(cells) == 8, line
            a, b = (float(c) if re.fullmatch(NUMBER, c) else None for c in (cells[1], cells[4]))
            values[tuple(path)] = (a, b)
            for wall, cpu in ((cells[1], cells[3]), (cells[4], cells[6])):
                # A phase's thread ran it: its CPU time is given, and no more than its wall time
                # (the "other" rows are differences, so only roughly).
                if re.fullmatch(NUMBER, wall) and "other" not in line:
                    assert re.fullmatch(NUMBER, cpu) and float(cpu) <= float(wall) + 0.2, line
        for column in (0, 1):
            step = values[("step",)][column]
            assert step is not None and step > 0
            top = [v[column] for k, v in values.items() if len(k) == 2 and k[0] == "step"]
            assert abs(sum(top) - step) <= 0.02 * step + 0.2, (name, column, out)
            # The timers, not the remainder, hold the step.
            assert values[("step", "other")][column] < 0.1 * step, out
            backward = values[("step", "backward")][column]
            # Split at the last gradient (with overlap, the hooks' phases are timed inside it too).
            halves = [v[column] for k, v in values.items()
                      if k[:2] == ("step", "backward") and len(k) == 3 and "the last gradient" in k[2]]
            assert len(halves) == 2 and abs(sum(halves) - backward) <= 0.02 * backward + 0.2, out
    hook = {k: v for k, v in _rows(tables[0][2]).items()}
    background = hook["bucket reductions (background thread)"]
    assert 0 < hook["algorithm (Adasum._reduce)"] <= background, out
    delta = _rows(tables[1][2])
    step = delta["optimizer step"]
    named = sum(delta[k] for k in ("check", "snapshot", "local step (inner Adam, then new - old)", "all_reduce",
                                   "apply (old + reduced delta)"))
    # The delta optimizer's phases cover its step.
    assert 0.9 * step <= named <= step + 0.2, out
    assert 0 < delta["algorithm (Adasum._reduce)"] < delta["all_reduce"], out
    overlapped = _rows(tables[2][2])
    # With overlap=True the buckets are stepped inside backward (or in step() for those left) and
    # reduced on the background thread; step() waits for them.
    stepped = overlapped["bucket step (snapshot, inner Adam, new - old)"]
    assert 0 < stepped <= overlapped["backward"] + overlapped["optimizer step"] + 0.2, out
    assert 0 < overlapped["algorithm (Adasum._reduce)"] <= overlapped["bucket reductions (background thread)"], out
    assert "waiting for the reductions" in overlapped, out


def _rows(body: str) -> dict[str, float]:
    """The Adasum setup's milliseconds by label (the first row of each label)."""
    rows: dict[str, float] = {}
    for line in body.splitlines()[2:]:
        cells = _cells(line)
        if re.fullmatch(NUMBER, cells[4]):
            rows.setdefault(cells[0], float(cells[4]))
    return rows


# 30-70 s of 8 host devices: out of the default run, which must stay under 20 minutes on 2
# cores; tests/test_jax.py checks the same collective's results there.
@pytest.mark.long
def test_profile_jax_accounts_for_the_collective() -> None:
    pytest.importorskip("jax")
    out = _run("profile_jax.py")
    head = re.search(rf"psum ({NUMBER}) ms, adasum ({NUMBER}) ms", out)
    assert head, out
    rows = [_cells(line) for line in out.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert rows[0] == ["stage", "ms", "% of adasum", "memory traffic MB (XLA)"]
    table = {r[0]: (float(r[1]), float(r[3])) for r in rows[1:]}
    whole_ms, whole_mb = table.pop("**adasum.jax.all_reduce**")
    psum_ms, _ = table.pop("**psum**")
    assert (psum_ms, whole_ms) == (float(head.group(1)), float(head.group(2)))
    # 8 devices: three halving levels of four stages each, then the gather of the rows.
    stages = [k for k in table if k.startswith("exchange ")]
    assert len(stages) == 12 and "final all_gather of the rows" in table, out
    assert [float(re.search(r"\((\S+) MB\)", k).group(1)) for k in stages if "ppermute" in k] == [0.13, 0.07, 0.03]
    # The stages add up to the collective (the rows are differences of prefixes) ...
    assert abs(sum(ms for ms, _ in table.values()) - whole_ms) <= 0.01 * len(table) + 0.01, out
    # ... and the instrumented prefix is the collective: what it leaves out moves no memory.
    assert abs(table["rest (row selection, unpadding)"][1]) <= 0.05 * whole_mb + 0.1, out
    assert all(table[k][1] > 0 for k in stages if "partial sums" in k), out
