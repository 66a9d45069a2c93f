"""The ``adasum`` program's options: every subcommand's arguments, declared here once.

The options that set a :class:`~adasum.lab.config.RunConfig` field are made from the field
(:func:`add_config_options`): its help text, choices and default are written next to it, and
the config's own validation is the one check of their values. Every list option is
comma-separated; ``--help`` shows every option's default.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from dataclasses import fields

from adasum._version import __version__
from adasum.lab.config import OPTIMIZERS, REDUCERS, RunConfig
from adasum.lab.diloco import LOCAL_SECTIONS
from adasum.lab.sections import SCALES, SECTIONS
from adasum.lab.tasks import TASKS

__all__ = ["USAGE_ERROR", "BENCHMARKS", "build_parser", "config_from"]

USAGE_ERROR = 2
#: The benchmark scripts of a source checkout, by ``adasum bench`` name.
BENCHMARKS = {"collective": "bench_collective.py", "training": "bench_training.py", "jax": "bench_jax.py"}
#: Choices of fields whose registry sits above the config (the tasks import it).
_FIELD_CHOICES = {"task": TASKS}
_DEVICE_HELP = "cpu, cuda or cuda:N"
_CHUNK_HELP = ("workers whose gradients are taken in one batched call (default: as many as fit in 256 MiB of "
               "activations, an eighth of the GPU's memory on CUDA)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2, with the
    prefix of every other error of the program (argparse's own names the subcommand)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(USAGE_ERROR, f"adasum: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows an option's default, except where there is none to show (None, a flag's
    False, an empty list): the option's text says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def _one_of(choices: Sequence[str], what: str) -> Callable[[str], str]:
    """The type of an option with ``choices``: argparse's "invalid choice" naming what was asked for."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: unknown {what} {text!r} (choose from {', '.join(choices)})")
        return text
    return parse


_KINDS = {int: "an integer", float: "a number"}


def _list_of(kind: type[int] | type[float]) -> Callable[[str], list]:
    """The type of a comma-separated list of numbers; the error names the item that is wrong."""
    def parse(text: str) -> list:
        values = []
        for item in filter(None, (v.strip() for v in text.split(","))):
            try:
                values.append(kind(item))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not {_KINDS[kind]}") from None
        return values
    return parse


def _names(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """The type of a comma-separated list of ``choices``."""
    one = _one_of(choices, what)
    return lambda text: [one(v.strip()) for v in text.split(",") if v.strip()]


def add_config_options(parser: argparse.ArgumentParser, *names: str, **defaults: typing.Any) -> None:
    """An option for each :class:`RunConfig` field in ``names``, with the field's flag, type,
    choices, help and default (``defaults`` where this command's differs)."""
    types = typing.get_type_hints(RunConfig)
    by_name = {f.name: f for f in fields(RunConfig)}
    for name in names:
        meta = by_name[name].metadata
        flag = RunConfig.flag(name)
        # ``int | None`` and the like: the option's type is the one that is not None.
        kind = next(t for t in typing.get_args(types[name]) or (types[name],) if t is not type(None))
        choices = meta["choices"] or _FIELD_CHOICES.get(name)
        option = {"type": kind, "help": meta["help"], "default": defaults.get(name, by_name[name].default)}
        if choices:
            what = flag.lstrip("-").replace("-", " ")
            option.update(type=_one_of(choices, what), choices=choices, metavar=what.upper().replace(" ", "_"),
                          help=f"{meta['help']}; one of %(choices)s")
        parser.add_argument(flag, dest=name, **option)


def config_from(args: argparse.Namespace, **changes: typing.Any) -> RunConfig:
    """The validated :class:`RunConfig` of the parsed ``args`` (the fields they have options
    for; the others their defaults), with ``changes``."""
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    return RunConfig(**{**given, **changes}).validated()


_RUN_FIELDS = ("task", "data", "samples", "schedule", "warmup", "epochs", "seed", "target", "evals_per_epoch")


def _subcommand(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Help)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``adasum`` command; the subcommand's name is ``command``."""
    parser = _Parser(prog="adasum", description="Adaptive Summation: train, simulate, study, benchmark, demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = _subcommand(sub, "train", "real data-parallel training on N local workers or under torchrun")
    add_config_options(train, *_RUN_FIELDS, "reducer", "optimizer", "mode", "lr", "batch", "accum", "sync_every",
                       "outer", "outer_lr")
    train.add_argument("--nproc", type=int, help="start this many local Gloo workers (default: torchrun's, else 1)")
    train.add_argument("--out", default="runs/train", help="history.csv/json and checkpoint.pt go here")
    train.add_argument("--resume", help="continue from this checkpoint.pt (same options; --epochs may grow; "
                       "any number of workers, see --auto-resume)")
    train.add_argument("--auto-resume", action="store_true",
                       help="continue from --out's checkpoint.pt if there is one, else start: the command an "
                       "elastic job (torchrun --nnodes=MIN:MAX --max-restarts=K) reruns. On another number of "
                       "workers the step count continues, the examples per step stay if the workers divide "
                       "them (else as many whole micro-batches per worker as fit; a line says what changed), "
                       "rank r takes old rank r mod N's optimizer state")
    train.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                       help="also checkpoint every K steps (0: at the end of every epoch only)")
    train.add_argument("--timeout", type=float, default=3600, help="seconds before the workers are stopped")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    sim = _subcommand(sub, "simulate", "the convergence study with N simulated workers in one process",
                      "Every combination of the comma-separated lists (--workers, --reducers, --optimizers, "
                      "--lrs, --batches, --accums) is one run; the others are options of every run.")
    add_config_options(sim, *_RUN_FIELDS, "mode", "sync_every", "outer", "outer_lr")
    sim.add_argument("--workers", type=_list_of(int), default="1,2,4,8,16,32,64", metavar="N,...",
                     help="simulated worker counts, comma-separated")
    sim.add_argument("--reducers", type=_names(tuple(REDUCERS), "reducer"), default=",".join(REDUCERS), metavar="REDUCER,...",
                     help=f"reducers, comma-separated, from {', '.join(REDUCERS)}")
    sim.add_argument("--optimizers", type=_names(OPTIMIZERS, "optimizer"), default="momentum", metavar="OPTIMIZER,...",
                     help=f"optimizers, comma-separated, from {', '.join(OPTIMIZERS)}")
    sim.add_argument("--lrs", type=_list_of(float), default="0.05", metavar="LR,...", help="learning rates, comma-separated")
    sim.add_argument("--batches", type=_list_of(int), default="32", metavar="BATCH,...",
                     help="examples per worker per micro-batch, comma-separated")
    sim.add_argument("--accums", type=_list_of(int), default="1", metavar="ACCUM,...",
                     help="micro-batches per worker before the workers reduce, comma-separated")
    sim.add_argument("--no-distances", action="store_true", help="skip the distance to sequential SGD")
    sim.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    sim.add_argument("--worker-chunk", type=int, help=_CHUNK_HELP)
    sim.add_argument("--geometry", action="store_true",
                     help="instead of training: Adasum of vectors with a given pairwise cosine against sum and average")
    sim.add_argument("--title", default="adasum simulate", help="the title of the report and its plots")
    sim.add_argument("--out", default="runs/simulate", help="the report, its plots and tables go here")

    study = _subcommand(sub, "study", "one section of the large-batch study, resumable (see adasum.lab.study)",
                        "Runs a section until its plan is complete: every combiner tuned on one learning-rate "
                        "axis at every E (widened while a best rate sits at an end; more seeds at the best "
                        "rates), and the recipe reading at fixed hyperparameters. Writes protocol.md, tuned.md "
                        "and recipe.md (verdicts with 95%% bootstrap intervals), orthogonality.md, the plots, "
                        "and runs/<id>.json per run; a rerun continues where an interrupted one stopped. "
                        "The local SGD section (diloco, adasum.lab.diloco) tunes the outer rate instead and writes "
                        "diloco.md (its three questions' verdicts), rates.md and orthogonality.md.")
    names = (*SECTIONS, *LOCAL_SECTIONS)
    study.add_argument("name", type=_one_of(names, "study section"), choices=names,
                       metavar="NAME", help="the section (see adasum.lab.sections): one of %(choices)s")
    study.add_argument("--scale", type=_one_of(SCALES, "scale"), choices=SCALES, default="cpu", metavar="SCALE",
                       help="cpu (a laptop's grid) or gpu (the study proper; use --device cuda)")
    study.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    study.add_argument("--worker-chunk", type=int, help=_CHUNK_HELP)
    study.add_argument("--out", help="runs/ and the report go here (default: runs/study/NAME-SCALE)")
    study.add_argument("--no-progress", action="store_true", help="no progress bar")

    noise = _subcommand(sub, "noise", "the gradient noise scale B_simple (critical batch) along one run")
    add_config_options(noise, *_RUN_FIELDS, "optimizer", "mode", "lr", "batch", batch=1024)
    noise.add_argument("--workers", type=int, default=8,
                       help="simulated workers whose average is that worker (the second batch size)")
    noise.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    noise.add_argument("--worker-chunk", type=int, help=_CHUNK_HELP)
    noise.add_argument("--levels", type=_list_of(float), default="", metavar="SCORE,...",
                       help="scores, comma-separated, at which to report B_simple too: candidate targets")
    noise.add_argument("--out", help="write the run's history.csv and summary.json here")

    bench = _subcommand(sub, "bench", "run a benchmark script of the source checkout")
    bench.add_argument("which", choices=sorted(BENCHMARKS), help="the benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark (see its --help)")

    demo = _subcommand(sub, "demo", "digits on 4 worker processes, Adasum against averaging")
    demo.add_argument("--nproc", type=int, default=4, help="worker processes")
    demo.add_argument("--epochs", type=int, default=8, help="passes over the training set")
    demo.add_argument("--out", default="runs/demo", help="the runs, their report and curves.png go here")
    return parser
