"""The package a user builds from a clone: ``python -m build`` makes an sdist and, from it, a
wheel that installs into a fresh virtual environment, imports from there (not from the
checkout), carries its package data and compiled kernels, runs its ``adasum`` command, and
declares exactly the dependencies and extras pyproject.toml declares; pip resolves it with the
extras the test set-up installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = re.search(r'__version__ = "(.+)"', (ROOT / "src/adasum/_version.py").read_text()).group(1)


def _run(*command: str | Path, cwd: Path) -> str:
    # Without PYTHONPATH: a checkout's src/ on it would hide what the wheel installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the bin/ directory of a fresh venv it is installed in)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git clone: the build starts from its tracked files")
    tmp = tmp_path_factory.mktemp("wheel")
    clone = tmp / "clone"
    # The tracked files only, as a fresh clone has them: no built kernels, no egg-info.
    for name in _run("git", "ls-files", "-z", cwd=ROOT).split("\0"):
        if name and (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    _run(sys.executable, "-m", "build", "--outdir", tmp / "dist", clone, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("adasum-*.whl")
    # torch and the rest come from this environment (a .pth line puts its site-packages after the
    # new venv's own, and its .pth files, an editable adasum among them, are not processed).
    _run(sys.executable, "-m", "venv", "--without-pip", tmp / "venv", cwd=tmp)
    bin_dir = tmp / "venv" / "bin"
    venv_site = Path(_run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                          cwd=tmp).strip())
    (venv_site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", wheel, cwd=tmp)
    return wheel, bin_dir


def test_wheel_installs_and_runs(built: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, bin_dir = built
    assert wheel.name.startswith(f"adasum-{VERSION}-")
    probe = (
        "import importlib.util, pathlib, torch, adasum\n"
        "pkg = pathlib.Path(adasum.__file__).parent\n"
        "print(pkg)\n"
        "print((pkg / 'py.typed').is_file(), (pkg / '_kernels.c').is_file())\n"
        "print(importlib.util.find_spec('adasum._kernels') is not None)\n"
        # Adasum of orthogonal vectors is their sum.
        "print(adasum.combine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).tolist())\n"
    )
    out = _run(bin_dir / "python", "-c", probe, cwd=tmp_path).splitlines()
    assert Path(out[0]).is_relative_to(bin_dir.parent), f"adasum was imported from {out[0]}, not the wheel"
    assert out[1] == "True True", "py.typed and the kernels' source are package data"
    if sysconfig.get_config_var("CC") and shutil.which(sysconfig.get_config_var("CC").split()[0]):
        assert out[2] == "True", "a C compiler is here, yet the wheel has no compiled kernels"
    assert out[3] == "[1.0, 2.0]"
    assert _run(bin_dir / "adasum", "--version", cwd=tmp_path).strip().endswith(VERSION)


def _declared(wheel: Path) -> dict[str, list[str]]:
    """The wheel's Requires-Dist by extra ("" for the core), each without its extra marker."""
    with zipfile.ZipFile(wheel) as archive:
        meta = Parser().parsestr(archive.read(f"adasum-{VERSION}.dist-info/METADATA").decode())
    declared: dict[str, list[str]] = {extra: [] for extra in meta.get_all("Provides-Extra", [])}
    declared[""] = []
    for line in meta.get_all("Requires-Dist", []):
        requirement, _, marker = line.partition(";")
        extra = re.fullmatch(r'\s*extra == "(.+)"\s*', marker) if marker else None
        assert marker == "" or extra, f"unexpected marker in {line!r}"
        declared[extra.group(1) if extra else ""].append(str(Requirement(requirement)))
    return declared


def test_wheel_declares_pyproject_extras(built: tuple[Path, Path]) -> None:
    expected = {extra: [str(Requirement(r)) for r in reqs]
                for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
    expected[""] = [str(Requirement(r)) for r in PYPROJECT["project"]["dependencies"]]
    assert _declared(built[0]) == expected


def test_set_up_extras_resolve(built: tuple[Path, Path], tmp_path: Path) -> None:
    """pip resolves the wheel with the extras scripts/test.sh installs from what this
    environment (the one CI sets up) holds, offline: every requirement of theirs is met here."""
    names = re.search(r'ADASUM_EXTRAS="([^"]+)"', (ROOT / "scripts/test.sh").read_text()).group(1)
    assert set(names.split(",")) <= set(PYPROJECT["project"]["optional-dependencies"]), names
    out = _run(sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check",
               f"{built[0]}[{names}]", cwd=tmp_path)
    assert f"Would install adasum-{VERSION}" in out, out
