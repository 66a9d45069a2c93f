"""The README, followed literally, cannot drift from the code.

Its ``sh`` blocks: every command names a script, example, benchmark, module, console command,
option and extra that exist, and its options parse (a script runs up to the end of its
``parse_args`` and stops there; a tool's module, ``build`` or ``pytest``, runs with ``--help``
appended, so a bad value exits 2 before the help); the quick ones, ``adasum --help`` and
``adasum --version``, run. Its ``python`` blocks run in a 2-process Gloo group, each on the
names it leaves to the reader (``tensors``, ``model``, ...) made here, with their results
checked where the block computes one.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import adasum
from adasum.launch import spawn
from conftest import TIMEOUT, same_bits

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
TORCH_PIN = re.search(r"torch==[\w.+]+", (ROOT / "scripts/setup.sh").read_text()).group(0)


def blocks(language: str) -> list[str]:
    """The README's fenced blocks opened with ```language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.M | re.S)


def commands() -> list[list[str]]:
    """Each command of the ``sh`` blocks as words: comments dropped, ``;`` and ``&&`` split."""
    found = []
    for line in "\n".join(blocks("sh")).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
        for sep, group in itertools.groupby(words, key=lambda w: w in (";", "&&")):
            if not sep:
                command = list(group)
                found.append(command[1:] if command[0] == "time" else command)  # the shell's timer
    return found


def variants(words: list[str]) -> list[list[str]]:
    """The concrete command lines a template stands for: ``...`` dropped, ``[--opt x]``'s brackets
    dropped, and ``a|b|c`` expanded into one line per alternative."""
    words = [w.strip("[]") for w in words if w != "..."]
    return [list(line) for line in itertools.product(*(w.split("|") for w in words))]


#: ``python -c PARSE_ONLY FILE ARGS`` runs FILE as ``python FILE ARGS`` would, up to the end of its
#: first ``parse_args``: exit 0 if ARGS parse (every option known, every value valid, nothing left
#: over), 2 with argparse's message if not, and no work done either way.
PARSE_ONLY = """
import argparse, os, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_exit(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_then_exit
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _script(words: list[str], runs: set[tuple[str, ...]]) -> None:
    """``python FILE ARGS``: the file is in the checkout; ARGS, if any, parse (collected in
    ``runs``, each run later in its own process)."""
    path = ROOT / words[0]
    assert path.is_file(), f"the README runs {words[0]}, which is not in the checkout"
    if len(words) > 1:
        assert re.search(r"\bparse_\w*args\(", path.read_text()), f"{words[0]} parses no options, the README gives it {words[1:]}"
        runs.add((sys.executable, "-c", PARSE_ONLY, *words))


def _adasum(words: list[str], runs: set[tuple[str, ...]]) -> None:
    """``adasum ARGS``: the program's parser accepts ARGS (in this process: it is quick), and
    ``adasum bench NAME ARGS`` names a benchmark script that accepts ARGS."""
    from adasum.lab.cli import build_parser
    from adasum.lab.options import BENCHMARKS

    try:
        args = build_parser().parse_args(words)
    except SystemExit as stop:  # --help and --version exit 0, a refusal 2
        assert stop.code == 0, f"adasum {' '.join(words)} is refused"
        return
    if args.command == "bench":
        _script([f"benchmarks/{BENCHMARKS[args.which]}", *args.args], runs)


def _pip(words: list[str], runs: set[tuple[str, ...]]) -> None:
    """``pip install ...``: torch at the pin setup.sh installs, extras that pyproject declares."""
    assert words[0] == "install", words
    for word in words[1:]:
        if word.startswith("torch"):
            assert word == TORCH_PIN, f"the README pins {word}, scripts/setup.sh {TORCH_PIN}"
        for extras in re.findall(r"\[([\w,]+)\]$", word):
            assert set(extras.split(",")) <= EXTRAS, f"{word}: no such extra in pyproject.toml"


def _python(words: list[str], runs: set[tuple[str, ...]]) -> None:
    """``python -m MODULE ARGS`` (the module and its options exist) or ``python FILE ARGS``."""
    if words[0] != "-m":
        _script(words, runs)
    elif words[1] == "adasum.lab":
        _adasum(words[2:], runs)
    elif words[1] != "venv":  # the standard library's; its argument is the directory to make
        # A tool's own parser (build, pytest): with --help appended, the options before it must
        # exist and parse (what is left over goes unchecked).
        runs.add((sys.executable, *words, "--help"))


def _torchrun(words: list[str], runs: set[tuple[str, ...]]) -> None:
    """``torchrun OPTIONS (FILE | -m MODULE) ARGS``: the launcher accepts OPTIONS, then the rest."""
    from torch.distributed.run import get_args_parser

    at = next(i for i, w in enumerate(words) if w == "-m" or w.endswith(".py"))
    get_args_parser().parse_args([*words[:at], "script.py"])
    _python(words[at:], runs)


def _bash(words: list[str], runs: set[tuple[str, ...]]) -> None:
    assert (ROOT / words[0]).is_file(), f"the README runs {words[0]}, which is not in the checkout"


CHECKS = {
    "adasum": _adasum,
    "bash": _bash,
    "python": _python,
    "python3": _python,
    ".venv/bin/python": _python,
    "torchrun": _torchrun,
    "pip": _pip,
    ".": lambda words, runs: None,  # activates the .venv that a command before it made
}


#: The extras the test set-up does not install (scripts/test.sh): a script that needs one can only
#: be checked as far as its imports where it is missing.
UNINSTALLED_EXTRAS = ("ray", "transformers")


def _exits_zero(argv: tuple[str, ...]) -> str | None:
    """What is wrong with ``argv``, if anything: it must exit 0 (or stop at the import of an
    extra that is not installed here)."""
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    missing = [m for m in UNINSTALLED_EXTRAS
               if f"No module named '{m}'" in done.stderr and importlib.util.find_spec(m) is None]
    if done.returncode == 0 or missing:
        return None
    return f"{' '.join(argv[-4:])}: exit {done.returncode}\n{done.stderr[-2000:]}"


def test_readme_has_commands_and_snippets() -> None:
    # The parsing above finds what it is meant to (a README of indented blocks would pass empty).
    names = {words[0] for words in commands()}
    assert {"bash", "adasum", "torchrun", "python", "pip"} <= names, names
    assert len(blocks("python")) == len(SNIPPETS)


def test_every_example_has_its_launch_line() -> None:
    launched = {word for words in commands() for word in words if word.startswith("examples/")}
    examples = {f"examples/{path.name}" for path in (ROOT / "examples").glob("*.py")}
    assert launched == examples - {"examples/digits_data.py"}  # the helper the examples import


def test_every_command_exists_and_parses() -> None:
    unknown = {words[0] for words in commands()} - set(CHECKS)
    assert not unknown, f"the README runs {unknown}: teach this test to check them"
    runs: set[tuple[str, ...]] = set()
    for words in commands():
        for line in variants(words):
            CHECKS[line[0]](line[1:], runs)
    # The scripts' parsers run in their own processes, two at a time (most import torch).
    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(_exits_zero, sorted(runs)) if p]
    assert not problems, "\n".join(problems)


def test_quick_commands_run() -> None:
    """The README's ``--help`` and ``--version`` lines run as a user types them."""
    program = Path(sys.executable).parent / "adasum"
    if not program.exists():
        pytest.skip("the adasum command is not installed beside this Python")
    quick = [words for words in commands() if words[0] == "adasum" and words[1:] in (["--help"], ["--version"])]
    assert len(quick) == 2, quick
    for words in quick:
        done = subprocess.run([str(program), *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert adasum.__version__ in done.stdout


# ------------------------------------------------------------------- the python blocks

def _tensors(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s layers: the same on every process that asks."""
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(4, 5, generator=generator), torch.randn(3, generator=generator)]


def _collective(rank: int, world: int) -> dict:
    tensors = _tensors(rank)
    return {"tensors": tensors, "buf": torch.cat([t.flatten() for t in tensors]), "numels": [20, 3],
            "per_rank": [_tensors(r) for r in range(3)], "a": torch.ones(3), "b": torch.arange(3.0)}


def _check_collective(names: dict, world: int) -> None:
    expected = adasum.reduce([_tensors(r) for r in range(world)])
    assert same_bits(names["tensors"], expected)
    assert same_bits(names["buf"], torch.cat([t.flatten() for t in expected]))


def _reducer(rank: int, world: int) -> dict:
    # The block goes on from the one before it, which imports adasum.
    return {"adasum": adasum, "group": dist.group.WORLD, "tensors": _tensors(rank)}


def _check_reducer(names: dict, world: int) -> None:
    assert same_bits(names["tensors"], adasum.reduce([_tensors(r) for r in range(world)]))


def _model(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # different on each rank: broadcast_parameters must make them equal
    return {"model": nn.Linear(4, 2), "DDP": nn.parallel.DistributedDataParallel}


def _check_ddp(names: dict, world: int) -> None:
    model = names["model"]
    model(torch.randn(8, 4)).square().sum().backward()  # the hook reduces the gradients
    grads = [torch.empty_like(model.module.weight.grad) for _ in range(world)]
    dist.all_gather(grads, model.module.weight.grad)
    assert all(same_bits(g, grads[0]) for g in grads)


def _check_delta(names: dict, world: int) -> None:
    weight = names["model"].weight.detach()
    weights = [torch.empty_like(weight) for _ in range(world)]
    dist.all_gather(weights, weight)
    assert all(same_bits(w, weights[0]) for w in weights)
    assert names["opt"].backward_passes_per_step == 4


def _sharded(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    return {"model": model, "fully_shard": fully_shard, "mesh": init_device_mesh("cpu", (world,))}


def _check_sharded(names: dict, world: int) -> None:
    from torch.distributed.fsdp import FSDPModule

    assert all(isinstance(block, FSDPModule) for block in names["model"].blocks)


#: For each python block, by its first line: what to make before it and check after it, or why
#: it is not run here (then a test or an example runs the same calls).
SNIPPETS: dict[str, tuple | str] = {
    "import adasum": (_collective, _check_collective),
    'reducer = adasum.Adasum(group, algorithm="auto")   # or "vhdd" / "gather"': (_reducer, _check_reducer),
    "from adasum.ddp import AdasumState, adasum_hook": (_model, _check_ddp),
    "from adasum.optim import DistributedOptimizer, Lamb, broadcast_parameters": (_model, _check_delta),
    "from adasum.fsdp import use_adasum": (_sharded, _check_sharded),
    "from adasum.keras import DistributedOptimizer, broadcast_variables":
        "needs Keras and TensorFlow and leaves the model and data to the reader: tests/test_keras.py "
        "and examples/keras_digits.py run the same calls",
}


def _run_snippets(rank: int, world: int, snippets: list[tuple[str, str]]) -> list[str]:
    """Run each (name, code) with the names its setup makes; the names of those that ran."""
    ran = []
    for first, code in snippets:
        setup, check = SNIPPETS[first]
        names = setup(rank, world)
        exec(compile(code, f"README.md: {first}", "exec"), names)  # noqa: S102 - the README's own code
        check(names, world)
        ran.append(first)
    return ran


def test_python_blocks_run_in_a_2_process_group() -> None:
    found = {code.splitlines()[0]: code for code in blocks("python")}
    assert set(found) == set(SNIPPETS), "a README python block was added, changed or removed: update SNIPPETS"
    runnable = [(first, code) for first, code in found.items() if not isinstance(SNIPPETS[first], str)]
    assert len(runnable) == 5
    results = spawn(_run_snippets, 2, runnable, timeout=TIMEOUT)
    assert results == [[first for first, _ in runnable]] * 2
