"""The ``adasum`` program: every subcommand at a tiny size, and bad input -> one line, exit 2."""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adasum.lab
from adasum.lab import MISSING_EXTRA
from adasum.lab.cli import build_parser, main
from adasum.lab.config import RunConfig
from adasum.lab.options import config_from


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(args: list[str], capsys, fragment: str) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("adasum: error: "), err
    assert "Traceback" not in err and fragment in err, err


@pytest.fixture
def nothing_runs(monkeypatch) -> None:
    """Bad input is refused before any worker starts or any simulated run trains."""
    def never(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr("adasum.launch.spawn", never)
    monkeypatch.setattr("adasum.lab.simulate.sweep", never)
    monkeypatch.setattr("adasum.lab.geometry.geometry", never)


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, str]:
    text_csv = tmp_path / "text.csv"
    text_csv.write_text("a,b,label\n1,2,0\n3,x,1\n")
    ragged_csv = tmp_path / "ragged.csv"
    ragged_csv.write_text("1,2,0\n3,1\n")
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"not a zip archive")
    wrong_keys = tmp_path / "keys.npz"
    np.savez(wrong_keys, features=np.zeros((4, 2)), labels=np.zeros(4))
    other = tmp_path / "data.txt"
    other.write_text("1,2\n")
    files = {"text": str(text_csv), "ragged": str(ragged_csv), "junk": str(not_npz),
             "keys": str(wrong_keys), "txt": str(other), "missing": str(tmp_path / "nope.npz")}
    # Finite in float64, inf once cast to the float32 the model sees.
    huge_csv = tmp_path / "huge.csv"
    huge_csv.write_text("1,2,0\n3,1e39,1\n")
    files["huge_csv"] = str(huge_csv)
    labels = np.array([0, 1, 0, 1])
    for name, x, y in [("huge_x", np.full((4, 2), 1e39), labels),
                       ("huge_y", np.ones((4, 2)), np.full(4, -1e39)),
                       ("complex", np.ones((4, 2)) + 1j, labels),
                       ("no_features", np.ones((4, 0)), labels)]:
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        files[name] = str(tmp_path / f"{name}.npz")
    return files


@pytest.mark.parametrize("args, fragment", [
    (["train", "--task", "imagenet"], "unknown task"),
    (["train", "--optimizer", "adagrad"], "unknown optimizer"),
    (["train", "--reducer", "max"], "unknown reducer"),
    (["train", "--mode", "deltas"], "--mode: invalid choice"),
    (["simulate", "--mode", "update"], "--mode: invalid choice"),
    (["train", "--nproc", "0"], "--nproc"),
    (["train", "--lr", "0"], "learning rate"),
    (["train", "--lr", "-0.1"], "learning rate"),
    (["train", "--lr", "nan"], "learning rate"),
    (["train", "--target", "1.5"], "target"),
    (["train", "--batch", "2000", "--nproc", "1"], "training set"),
    (["train", "--task", "file"], "--data"),
    (["train", "--seed", "1e19"], "--seed"),
    (["train", "--seed", str(2**64)], "--seed must be a whole number from 0 to 4294967295"),
    (["simulate", "--seed", "-1"], "--seed must be a whole number"),
    (["train", "--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0"),
    (["train", "--timeout", "-5"], "--timeout"),
    (["train", "--timeout", "nan"], "--timeout"),
    (["train", "--timeout", "inf"], "--timeout"),
    (["train", "--samples", "0", "--task", "linear"], "--samples must be at least 1"),
    (["train", "--samples", "1e10", "--task", "linear"], "--samples"),
    (["simulate", "--samples", "2.5"], "--samples"),
    (["train", "--samples", str(10**10), "--task", "linear"], "GiB; this machine has"),
    (["train", "--nproc", "64", "--samples", str(10**8), "--task", "logistic"], "in each of 64 workers"),
    (["simulate", "--samples", str(10**10), "--task", "logistic"], "GiB; this machine has"),
    (["simulate", "--optimizers", "sgd,rmsprop"], "unknown optimizer"),
    (["simulate", "--lrs", "0.1,-1"], "learning rate"),
    (["simulate", "--lrs", "fast"], "--lrs"),
    (["simulate", "--workers", "0,4"], "--workers"),
    (["simulate", "--workers", "1,x"], "argument --workers: 'x' is not an integer"),
    (["simulate", "--lrs", "0.1,,fast"], "argument --lrs: 'fast' is not a number"),
    (["simulate", "--lrs", ","], "--lrs needs at least one value"),
    (["simulate", "--batches", "16,0"], "--batch must be at least 1, got 0"),
    (["simulate", "--reducers", "adasum,max"], "unknown reducer 'max' (choose from adasum, average, sum)"),
    (["train", "--schedule", "step"], "argument --schedule: invalid choice: unknown schedule 'step'"),
    (["simulate", "--outer-optimizer", "adam"], "unknown outer optimizer 'adam'"),
    (["study", "bert"], "unknown study section 'bert'"),
    (["study", "convex", "--scale", "tpu"], "unknown scale 'tpu' (choose from cpu, gpu)"),
    (["simulate", "--workers", ","], "--workers must be positive, got []"),
    (["simulate", "--workers", "0"], "--workers must be positive, got [0]"),
    (["simulate", "--geometry", "--workers", ","], "--workers"),
    (["simulate", "--target", "2"], "target"),
    (["demo", "--nproc", "0"], "--nproc"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment, capsys, nothing_runs):
    assert_usage_error(args, capsys, fragment)


@pytest.mark.parametrize("which, fragment", [
    ("missing", "does not exist"), ("text", "not all numbers"), ("ragged", "same number"),
    ("junk", "cannot read"), ("keys", "needs arrays"), ("txt", ".npz or .csv"),
    ("huge_csv", "must be finite in float32"), ("huge_x", "must be finite in float32"),
    ("huge_y", "must be finite in float32"),
    ("complex", "must be real numbers, got complex128 and int64"),
    ("no_features", "d >= 1, got (4, 0)"),
])
def test_bad_data_file_is_one_line_and_exit_2(which, fragment, bad_files, capsys, nothing_runs):
    assert_usage_error(["train", "--task", "file", "--data", bad_files[which]], capsys, fragment)


@pytest.mark.parametrize("command", [["train", "--nproc", "2"], ["simulate"], ["demo"],
                                     ["simulate", "--geometry"]])
def test_out_that_cannot_be_written_is_refused_before_the_run(command, tmp_path, capsys, nothing_runs):
    """Found at the start, not when the first checkpoint is saved after an epoch."""
    afile = tmp_path / "afile"
    afile.write_text("")
    assert_usage_error([*command, "--out", str(afile)], capsys, f"--out {str(afile)!r} is a file, not a directory")
    assert_usage_error([*command, "--out", str(afile / "run")], capsys, "cannot write to --out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission")
def test_out_without_write_permission_is_refused(tmp_path, capsys, nothing_runs):
    tmp_path.chmod(0o500)
    try:
        assert_usage_error(["train", "--out", str(tmp_path)], capsys, "Permission denied")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("module", ["adasum.lab", "adasum.lab.cli"])
def test_console_script_reports_without_traceback(module):
    """The program run as a module, not just main(): exit status and stderr as the user sees
    them."""
    proc = subprocess.run([sys.executable, "-m", module, "train", "--lr", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "adasum: error: the learning rate must be a positive number, got -1.0"]


def test_version(capsys):
    assert run_cli(["--version"], capsys)[:2] == (0, f"adasum {adasum.__version__}\n")


def test_every_option_has_help_and_shows_its_default():
    """The options of a run take their help and default from RunConfig's field, written once."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, (name, action.dest)
    for name, default in [("train", "(default: 0.05)"), ("simulate", "(default: 1,2,4,8,16,32,64)"),
                          ("noise", "(default: 1024)")]:
        assert default in " ".join(sub.choices[name].format_help().split()), name
    train = sub.choices["train"].parse_args([])
    assert config_from(train) == RunConfig()


def test_the_console_script_is_the_light_entry():
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "adasum"]
    assert script.value == "adasum.lab:main"


@pytest.mark.parametrize("module", adasum.lab.LAB_MODULES)
def test_missing_lab_extra_is_one_line_and_exit_2(module, monkeypatch, capsys):
    # A None entry in sys.modules is how Python marks a module unimportable; find_spec then
    # reports it missing, as it would in an environment without the package.
    monkeypatch.setitem(sys.modules, module, None)
    assert adasum.lab.main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == MISSING_EXTRA + "\n" and "pip install -e '.[lab]'" in err


def test_missing_lab_extra_as_the_user_sees_it():
    """A fresh interpreter without scikit-learn: the entry says what to install before the
    program imports anything of the lab."""
    code = ("import sys; sys.modules['sklearn'] = None; import adasum.lab; "
            "sys.exit(adasum.lab.main(['train', '--nproc', '2']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [MISSING_EXTRA]


def test_without_numpy_the_program_says_so_in_one_line():
    """Without numpy, torch would print a warning of its own when imported; the package imports
    its names lazily, so the program's entry speaks first and alone."""
    code = ("import sys; sys.modules['numpy'] = None; import adasum.lab; "
            "print('torch' in sys.modules); sys.exit(adasum.lab.main(['demo']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "False\n"
    assert proc.stderr.splitlines() == [MISSING_EXTRA]


def test_the_core_never_imports_the_lab():
    """Importing the library and the lab's entry module loads neither the program nor the lab's
    heavy dependencies (torch itself may import numpy and tqdm, so they are not checked here;
    the core's sources do not import them)."""
    code = ("import sys, adasum, adasum.ddp, adasum.optim; "
            "core = sorted(m for m in sys.modules if m.startswith('adasum.lab')); "
            "import adasum.lab; "
            "heavy = sorted(m for m in ('adasum.lab.cli', 'sklearn', 'matplotlib') if m in sys.modules); "
            "print(core, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []"


@pytest.mark.timeout(120)
def test_train_on_a_csv_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    y = (x[:, 0] > 0).astype(int)
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["f0", "f1", "f2", "label"])
        w.writerows([[*row, label] for row, label in zip(x, y)])
    code, out, _ = run_cli(["train", "--task", "file", "--data", str(path), "--nproc", "2",
                            "--batch", "8", "--epochs", "3", "--lr", "0.2", "--target", "0.8",
                            "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert len(rows) == 3 * (160 // 16)
    assert float(rows[-1]["score"]) >= 0.8, rows[-1]
    assert "| adasum | momentum | 2 | 16 |" in out


def test_simulate_tiny_sweep(tmp_path, capsys):
    out_dir = tmp_path / "sim"
    code, out, _ = run_cli(["simulate", "--workers", "1,2,2048", "--lrs", "0.05,0.1", "--epochs", "1",
                            "--batch", "16", "--target", "0.5", "--out", str(out_dir),
                            "--batches", "16"], capsys)
    assert code == 0
    summary = list(csv.DictReader(open(out_dir / "summary.csv")))
    # 2048 workers x 16 examples do not fit digits' 1,438 training examples: skipped, said so.
    assert len(summary) == 2 * 3 * 2 and "12 runs (6 skipped" in out
    for name in ("curves.csv", "table.md", "curves.png", "lr_range.png", "distances.md"):
        assert (out_dir / name).stat().st_size > 0, name
    # One worker count above one: no line of distances to draw (distances.md has the numbers).
    assert not (out_dir / "sequential_distance.png").exists()
    one_worker = [r for r in summary if r["workers"] == "1" and r["lr"] == "0.05"]
    # With one worker every reducer is the identity: the runs are the same run.
    assert len({r["train_loss"] for r in one_worker}) == 1


def test_simulate_geometry(tmp_path, capsys):
    code, out, _ = run_cli(["simulate", "--geometry", "--workers", "2,8", "--out", str(tmp_path)], capsys)
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "geometry.csv")))
    orthogonal = [r for r in rows if float(r["cosine"]) == 0]
    parallel = [r for r in rows if float(r["cosine"]) == 1]
    assert all(float(r["dist_to_sum"]) < 1e-12 for r in orthogonal)
    assert all(float(r["dist_to_average"]) < 1e-12 for r in parallel)
    assert "| 8 | 0.5 |" in out


@pytest.mark.timeout(300)
def test_bench_runs_the_collective_benchmark(capfd):
    code = main(["bench", "collective", "--quick"])
    out = capfd.readouterr().out
    assert code == 0 and "adasum.all_reduce ms" in out


@pytest.mark.timeout(300)
def test_demo_tiny(tmp_path, capsys):
    code, out, _ = run_cli(["demo", "--nproc", "2", "--epochs", "1", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "| adasum | momentum | 2 |" in out and "| average | momentum | 2 |" in out
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "adasum" / "history.csv").is_file()
