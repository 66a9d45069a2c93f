"""Run Horovod's own tests against ``adasum.horovod`` (PyTorch) and ``adasum.horovod.tensorflow``
/ ``adasum.horovod.keras`` (TensorFlow 2, Keras), with only the import lines changed.

    python scripts/horovod_conformance.py HOROVOD [--sizes 2,3,4] [--files test_torch.py,...]
    python scripts/horovod_conformance.py HOROVOD --files test_tensorflow.py --tf-modes eager,graph

HOROVOD is a Horovod source checkout or sdist (a directory or a .tar.gz); nothing is
downloaded. Horovod's test files are copied to a temporary directory (never into this
repository: they are Horovod's, under its license), their ``horovod`` imports are rewritten to
``adasum.horovod`` (and its TensorFlow and Keras modules), and each file runs under ``torchrun``
with pytest on every rank (TensorFlow too: its operations run on torch.distributed's group). The table
printed at the end gives passed / failed / skipped per file and world size (a test counts as
passed when it passed on every rank, as failed when it failed on any), how many of the failed
passed when run once more alone (in a fresh torchrun: torch.distributed pairs operations by the
order the ranks issue them, so a test that leaves the ranks out of step can fail the tests after
it), then each remaining failure's first error line. docs/horovod.md records a run.

What is not Horovod's: ``common.py`` (the three helpers the tests import from Horovod's
test/utils, written here, because Horovod's imports its launcher), and a small launcher that
exports HOROVOD_RANK / HOROVOD_SIZE from torchrun's RANK / WORLD_SIZE, as ``horovodrun --gloo``
does, so the tests take their Gloo-controller paths (re-initialisation, shutdown after each test).
Two choices the launcher can make without touching the files: ``--tf-modes`` runs
test_tensorflow.py (which TensorFlow's ``run_all_in_graph_and_eager_modes`` runs twice per test)
in eager mode and in TF1 graph mode as separate runs, so that each mode gets its own count; and
``--mpi-enabled`` makes ``hvd.mpi_enabled()`` return True, for the Adasum tests that Horovod
skipped without MPI (its Adasum ran only over MPI).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

# The checkout's command-line tools share one list syntax (benchmarks/_args.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _args import comma_list  # noqa: E402

TORCH_FILES = ("test_torch.py", "test_adasum_pytorch.py")
TF_FILES = ("test_tensorflow.py", "test_tensorflow2_keras.py", "test_adasum_tensorflow.py")
TEST_FILES = TORCH_FILES + TF_FILES
# Horovod's own modules a test file imports, copied (and rewritten) along with it.
COMPANIONS = {"test_tensorflow.py": ("base_test_tensorflow.py",)}
# The files whose test class TensorFlow's run_all_in_graph_and_eager_modes runs in both modes.
MODED_FILES = ("test_tensorflow.py",)
TF_MODES = ("eager", "graph")

# Horovod's module -> the one that replaces it.
MODULES = {
    "horovod.torch": "adasum.horovod",
    "horovod.tensorflow": "adasum.horovod.tensorflow",
    "horovod.tensorflow.keras": "adasum.horovod.keras",
    "horovod.keras": "adasum.horovod.keras",
}
# (pattern, replacement) per import line; everything else in the files stays as Horovod wrote it.
IMPORT_REWRITES = (
    (re.compile(r"^(\s*)import (horovod\.[\w.]+) as (\w+)\s*$"),
     lambda m: f"{m[1]}import {MODULES.get(m[2], m[2])} as {m[3]}"),
    (re.compile(r"^(\s*)from horovod\.torch(?:\.mpi_ops)? import (.+)$"), r"\1from adasum.horovod import \2"),
    (re.compile(r"^(\s*)import horovod\s*$"), r"\1import adasum.horovod as horovod"),  # examples: horovod.run
    # Horovod's private helper is TensorFlow's own question (is this eager?); a version
    # comparison helper is written here, in common.py.
    (re.compile(r"^(\s*)from horovod\.tensorflow\.util import _executing_eagerly\s*$"),
     r"\1from tensorflow import executing_eagerly as _executing_eagerly"),
    (re.compile(r"^(\s*)from horovod\.common\.util import is_version_greater_equal_than\s*$"),
     r"\1from common import is_version_greater_equal_than"),
)

# Written here, not copied: the helpers test_torch.py imports from Horovod's test/utils/common.py.
COMMON_PY = '''\
import contextlib
import os
import tempfile


def mpi_env_rank_and_size():
    """(rank, size) as an MPI launcher exports them; (0, 1) without one (torchrun is not MPI)."""
    for rank, size in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")):
        if rank in os.environ and size in os.environ:
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def skip_or_fail_gpu_test(test, message):
    """A GPU test without a GPU fails when HOROVOD_TEST_GPU=1, and is skipped otherwise."""
    if int(os.environ.get("HOROVOD_TEST_GPU", 0)):
        test.fail(message)
    test.skipTest(message)


@contextlib.contextmanager
def temppath():
    """A file path in a fresh temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "temp_test_file")


def is_version_greater_equal_than(ver, target):
    """Whether version string ver is target or later."""
    from packaging.version import Version
    return Version(ver) >= Version(target)
'''

# Runs pytest on one rank: Horovod's tests read HOROVOD_RANK / HOROVOD_SIZE (set by
# `horovodrun --gloo`) to know that the runtime can be shut down and started again. A TensorFlow
# mode replaces TensorFlow's decorator that runs every test in graph and in eager mode by one
# that runs it in that mode only; --mpi-enabled makes hvd.mpi_enabled() True before the test
# file imports it.
LAUNCHER_PY = '''\
import functools
import os
import sys

import pytest

os.environ["HOROVOD_RANK"] = os.environ["RANK"]
os.environ["HOROVOD_SIZE"] = os.environ["WORLD_SIZE"]
os.environ["KERAS_BACKEND"] = "tensorflow"  # Horovod's Keras was TensorFlow's
test_file, report_dir, timeout, select, tf_mode, mpi = sys.argv[1:7]
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "utils"))
log = open(os.path.join(report_dir, f"rank{os.environ['RANK']}.log"), "w")
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)
if mpi == "1":
    import adasum.horovod

    adasum.horovod.mpi_enabled = lambda: True
if tf_mode:
    from tensorflow.python.framework import ops, test_util

    def in_graph(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with ops.Graph().as_default(), self.session():
                return method(self, *args, **kwargs)
        return run

    def graph_only(cls):
        for name in dir(cls):
            if name.startswith("test") and name not in ("test_session", "test_scope") and callable(getattr(cls, name)):
                setattr(cls, name, in_graph(getattr(cls, name)))
        return cls

    test_util.run_all_in_graph_and_eager_modes = {"eager": lambda cls: cls, "graph": graph_only}[tf_mode]
sys.exit(pytest.main([
    test_file, "-v", "-p", "no:cacheprovider", "-o", "addopts=", f"--timeout={timeout}",
    f"--junitxml={os.path.join(report_dir, 'rank' + os.environ['RANK'] + '.xml')}",
    *(["-k", select] if select else []),
]))
'''


@dataclass
class Outcome:
    """One test's result over all ranks."""

    status: str  # "passed", "failed" or "skipped"
    message: str = ""


@dataclass
class Run:
    """One file at one world size: the whole file in one session, then each test that failed
    there once more alone, in a fresh session (torch.distributed matches operations by order,
    so a test that leaves the ranks out of step can fail the tests after it)."""

    file: str
    size: int
    mode: str = ""  # test_tensorflow.py's TensorFlow mode: "eager" or "graph"
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by "Class::test_name"
    alone: dict[str, Outcome] = field(default_factory=dict)
    note: str = ""  # why the run produced no or partial results (timeout, crash)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes.values())

    @property
    def label(self) -> str:
        return f"{self.file} ({self.mode})" if self.mode else self.file

    def final(self) -> dict[str, Outcome]:
        """Each test's outcome, a failure replaced by its outcome alone."""
        return {**self.outcomes, **self.alone}


def horovod_root(source: Path, scratch: Path, marker: str = "test/parallel/test_torch.py") -> Path:
    """The directory holding Horovod's ``marker`` file, unpacking an sdist into scratch first."""
    if source.is_file():
        with tarfile.open(source) as archive:
            archive.extractall(scratch / "sdist", filter="data")
        source = scratch / "sdist"
    for candidate in (source, *sorted(source.iterdir())):
        if (candidate / marker).is_file():
            return candidate
    raise SystemExit(f"{source}: no {marker} found (a Horovod checkout or sdist?)")


def describe(root: Path) -> str:
    """Horovod's version, and the commit when root is a git checkout."""
    version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (root / "horovod" / "__init__.py").read_text())
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip() if head.returncode == 0 else "not a git checkout"
    return f"Horovod {version.group(1) if version else '?'} ({commit})"


def rewrite_imports(text: str) -> str:
    lines = []
    for line in text.splitlines(keepends=True):
        for pattern, replacement in IMPORT_REWRITES:
            line = pattern.sub(replacement, line.rstrip("\n")) + ("\n" if line.endswith("\n") else "")
        lines.append(line)
    return "".join(lines)


def stage(root: Path, files: list[str], work: Path) -> Path:
    """Copies the test files into work/parallel (their imports rewritten) next to work/utils."""
    parallel, utils = work / "parallel", work / "utils"
    parallel.mkdir(parents=True)
    utils.mkdir()
    for name in dict.fromkeys(f for test in files for f in (test, *COMPANIONS.get(test, ()))):
        source = (root / "test" / "parallel" / name).read_text()
        (parallel / name).write_text(rewrite_imports(source))
    (utils / "common.py").write_text(COMMON_PY)
    (work / "launch.py").write_text(LAUNCHER_PY)
    return parallel


def run_file(test: Path, size: int, mode: str, reports: Path, args: argparse.Namespace) -> Run:
    """The file under torchrun with `size` processes (in TensorFlow mode `mode` if not ""),
    then each failed test alone."""
    run = Run(test.name, size, mode)
    run.note = launch(str(test), test.parent, size, reports, args, args.select or "", mode)
    run.outcomes = merge_reports(reports, size)
    retry = [node for node, o in run.outcomes.items() if o.status == "failed" and not raised_locally(o)]
    for node in retry if args.alone else []:
        alone = reports / "alone" / node.replace("::", ".")
        launch(f"{test}::{node}", test.parent, size, alone, args, "", mode)
        run.alone.update(merge_reports(alone, size))
    return run


# Raised by every rank alike before anything is sent, so such a failure cannot come from an
# earlier test's leftovers and is not worth a session of its own.
LOCAL_ERRORS = ("NotImplementedError", "AttributeError")


def raised_locally(outcome: Outcome) -> bool:
    return outcome.message.split(": ", 1)[-1].startswith(LOCAL_ERRORS)


def launch(target: str, cwd: Path, size: int, reports: Path, args: argparse.Namespace, select: str,
           mode: str) -> str:
    """pytest on `target` under torchrun; each rank writes rankN.log and rankN.xml to reports.
    Returns a note when the run had to be stopped."""
    reports.mkdir(parents=True)
    command = [
        args.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={size}",
        str(cwd.parent / "launch.py"), target, str(reports), str(args.test_timeout), select,
        mode, str(int(args.mpi_enabled)),
    ]
    with open(reports / "torchrun.log", "w") as log:
        # A session of its own, so that a run past its time is stopped with all its workers.
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=log, start_new_session=True)
        try:
            process.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own and stops them when told to.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return f"stopped after {args.run_timeout} s; logs in {reports}"
    return ""


def merge_reports(reports: Path, size: int) -> dict[str, Outcome]:
    """A test passed if it passed on every rank, failed if it failed anywhere, else skipped.
    A rank stopped before pytest wrote its JUnit report is read from its verbose log."""
    merged: dict[str, Outcome] = {}
    for rank in (f"rank{r}" for r in range(size)):
        xml = reports / f"{rank}.xml"
        outcomes = xml_outcomes(xml, rank) if xml.is_file() else log_outcomes(reports / f"{rank}.log", rank)
        for node, outcome in outcomes.items():
            previous = merged.get(node)
            if previous is None or rank_worse(outcome, previous):
                merged[node] = outcome
    return merged


# tf.test.TestCase's own method that pytest collects (and skips as "Not a test"), not Horovod's.
NOT_TESTS = ("test_session",)


def xml_outcomes(path: Path, rank: str) -> dict[str, Outcome]:
    return {
        f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}": case_outcome(case, rank)
        for case in ET.parse(path).getroot().iter("testcase") if case.get("name") not in NOT_TESTS
    }


# pytest -v prints "file::Class::test_name " when a test starts and its status when it ends.
LOG_LINE = re.compile(r"::(\w+::test_\w+) ?(PASSED|FAILED|SKIPPED|ERROR)?")


def log_outcomes(path: Path, rank: str) -> dict[str, Outcome]:
    """Outcomes from a verbose log; a test that started and never ended counts as hung."""
    outcomes: dict[str, Outcome] = {}
    text = path.read_text(errors="replace") if path.is_file() else ""
    for node, status in LOG_LINE.findall(text):
        if node.split("::")[-1] in NOT_TESTS:
            continue
        if status in ("PASSED", "SKIPPED"):
            outcomes[node] = Outcome(status.lower())
        else:
            outcomes[node] = Outcome("failed", f"{rank}: " + ("see its log" if status else "did not finish (hung)"))
    return outcomes


def case_outcome(case: ET.Element, rank: str) -> Outcome:
    for tag in ("failure", "error"):
        problem = case.find(tag)
        if problem is not None:
            return Outcome("failed", f"{rank}: {first_line(problem)}")
    skipped = case.find("skipped")
    if skipped is not None:
        return Outcome("skipped", skipped.get("message", ""))
    return Outcome("passed")


def first_line(problem: ET.Element) -> str:
    """The exception line pytest reports (its `message`), else the first line of the text."""
    text = problem.get("message") or (problem.text or "").strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def rank_worse(new: Outcome, old: Outcome) -> bool:
    order = {"passed": 0, "skipped": 1, "failed": 2}
    return order[new.status] > order[old.status]


def print_table(runs: list[Run], label: str) -> None:
    print(f"\nHorovod's tests against adasum.horovod ({label}), torchrun + Gloo\n")
    print("| file | ranks | passed | failed | skipped | of the failed, passed alone | passed in all |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        note = f" ({run.note})" if run.note else ""
        rescued = sum(o.status == "passed" for o in run.alone.values())
        print(f"| {run.label} | {run.size} | {run.count('passed')} | {run.count('failed')} | "
              f"{run.count('skipped')} | {rescued} | {run.count('passed') + rescued}{note} |")
    failures = [(run, node, o) for run in runs for node, o in run.final().items() if o.status == "failed"]
    if failures:
        print("\nFailures (first error line; the run alone where there was one):")
        for run, node, outcome in failures:
            print(f"  {run.label} n={run.size} {node.split('::')[-1]}: {outcome.message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("horovod", type=Path, help="a Horovod source checkout or sdist (.tar.gz)")
    parser.add_argument("--sizes", type=comma_list(int), default="2,3,4", metavar="N,...",
                        help="world sizes (default %(default)s)")
    parser.add_argument("--files", type=comma_list(str, TEST_FILES), default=",".join(TORCH_FILES), metavar="FILE,...",
                        help=f"Horovod test files, of {', '.join(TEST_FILES)} (default %(default)s)")
    parser.add_argument("--tf-modes", type=comma_list(str, TF_MODES), default=",".join(TF_MODES), metavar="MODE,...",
                        help=f"TensorFlow modes for {', '.join(MODED_FILES)}, one run each (default %(default)s)")
    parser.add_argument("--mpi-enabled", action="store_true",
                        help="hvd.mpi_enabled() returns True (Horovod's Adasum tests skip without MPI)")
    parser.add_argument("-k", dest="select", help="only the tests pytest's -k expression selects")
    parser.add_argument("--no-alone", dest="alone", action="store_false",
                        help="do not run the failed tests once more alone (quicker)")
    parser.add_argument("--test-timeout", type=int, default=300, help="seconds per test (pytest-timeout)")
    parser.add_argument("--run-timeout", type=int, default=3600, help="seconds per file and world size")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with torch and adasum")
    parser.add_argument("--keep", type=Path, help="stage and report here instead of a temporary directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hvd-conformance-") as scratch:
        work = args.keep or Path(scratch)
        root = horovod_root(args.horovod.resolve(), Path(scratch))
        parallel = stage(root, args.files, work / "tests")
        runs = [run_file(parallel / name, size, mode, work / "reports" / "-".join(filter(None, (Path(name).stem, mode,
                                                                                              str(size)))), args)
                for name in args.files for mode in (args.tf_modes if name in MODED_FILES else [""])
                for size in args.sizes]
        print_table(runs, describe(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
