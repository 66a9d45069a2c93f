"""The ``adasum`` program: ``train``, ``simulate``, ``study``, ``noise``, ``bench`` and ``demo``.

Anything the user can get wrong (an unknown task or optimizer, a bad data file or checkpoint,
``--nproc 0``, a learning rate <= 0, a target score above 1, an ``--out`` that cannot be
written) ends with one line on stderr and exit status 2, before any worker starts. A worker
that fails or dies ends the run with one line naming it (status 1); Ctrl-C with one line saying
where the last checkpoint is (status 130).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from adasum.lab.config import (
    MODES,
    OPTIMIZERS,
    OUTER_OPTIMIZERS,
    REDUCERS,
    SCHEDULES,
    ConfigError,
    RunConfig,
    Steps,
)
from adasum.lab.task import TaskError
from adasum.lab.tasks import TASKS, load_task
from adasum.launch import WorkerError

__all__ = ["main", "build_parser"]

FAILED = 1
USAGE_ERROR = 2
#: 128 + SIGINT: what a shell reports for a program that Ctrl-C ended.
INTERRUPTED = 130
#: The benchmark scripts of a source checkout, by ``adasum bench`` name.
BENCHMARKS = {"collective": "bench_collective.py", "training": "bench_training.py", "jax": "bench_jax.py"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2, with the
    prefix of every other error of the program (argparse's own names the subcommand)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"adasum: error: {message}\n")


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying where the run's progress was saved."""


def _list_of(kind: Callable[[str], float | int], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list, got {text!r}") from None
    return parse


def _names(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in names if v not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0] if bad else text!r} (choose from {', '.join(choices)})")
        return names
    return parse


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options one run has in both ``train`` and ``simulate``."""
    p.add_argument("--task", default="digits-mlp", help=f"one of {', '.join(TASKS)} (default digits-mlp)")
    p.add_argument("--data", help="a .npz (arrays x, y, optionally x_test, y_test) or .csv (last column = label) for "
                                  "--task file; a directory of text for the stdlib-transformer tasks (default: the "
                                  "standard library's .py files)")
    p.add_argument("--samples", type=int, help="training examples of a synthetic task (default 16384), of "
                                               "augdigits-resnet (default 65536), of gauss-logistic and teacher-mlp "
                                               "(default 4194304), windows of a text task (default all)")
    p.add_argument("--schedule", default="constant", help=f"learning-rate schedule: {', '.join(SCHEDULES)}")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, help="test score (accuracy, or R^2 for regression) to report steps/epochs to")
    p.add_argument("--evals-per-epoch", type=int, default=8, help="test evaluations per epoch (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adasum", description="Adaptive Summation: train, simulate, benchmark, demo.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="real data-parallel training on N local workers or under torchrun")
    _add_run_options(train)
    train.add_argument("--reducer", default="adasum", help=f"{', '.join(REDUCERS)} (default adasum)")
    train.add_argument("--optimizer", default="momentum", help=f"{', '.join(OPTIMIZERS)} (default momentum)")
    train.add_argument("--mode", choices=MODES, help="reduce the gradients (one optimizer step on the reduced "
                                                     "gradient) or each worker's optimizer update (delta); "
                                                     "default: gradient for sgd and momentum, delta for adam and lamb")
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--batch", type=int, default=32, help="examples per worker per micro-batch")
    train.add_argument("--accum", type=int, default=1, help="micro-batches per worker before the workers reduce")
    train.add_argument("--nproc", type=int, help="start this many local Gloo workers (default: torchrun's, else 1)")
    train.add_argument("--out", default="runs/train", help="history.csv/json and checkpoint.pt go here")
    train.add_argument("--resume", help="continue from this checkpoint.pt (same options; --epochs may grow)")
    train.add_argument("--timeout", type=float, default=3600, help="seconds before the workers are stopped")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)

    sim = sub.add_parser("simulate", help="the convergence study with N simulated workers in one process")
    _add_run_options(sim)
    sim.add_argument("--workers", type=_list_of(int, "--workers"), default=[1, 2, 4, 8, 16, 32, 64])
    sim.add_argument("--reducers", type=_names(REDUCERS, "reducer"), default=list(REDUCERS))
    sim.add_argument("--optimizers", type=_names(OPTIMIZERS, "optimizer"), default=["momentum"])
    sim.add_argument("--mode", choices=MODES, help="as for train (default: the optimizer's)")
    sim.add_argument("--lrs", type=_list_of(float, "--lrs"), default=[0.05])
    sim.add_argument("--sync-every", type=int, default=1, help="local SGD (delta mode): steps between reductions")
    sim.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS, help="DiLoCo: an outer step on the reduced delta")
    sim.add_argument("--outer-lr", type=float, default=0.7, help="its learning rate (default 0.7)")
    sim.add_argument("--batches", type=_list_of(int, "--batches"), default=[32])
    sim.add_argument("--accums", type=_list_of(int, "--accums"), default=[1])
    sim.add_argument("--no-distances", action="store_true", help="skip the distance to sequential SGD")
    sim.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    sim.add_argument("--worker-chunk", type=int,
                     help="workers whose gradients are taken in one batched call (default: as many as "
                          "fit in 256 MiB of activations, an eighth of the GPU's memory on CUDA)")
    sim.add_argument("--geometry", action="store_true",
                     help="instead of training: Adasum of vectors with a given pairwise cosine against sum and average")
    sim.add_argument("--title", default="adasum simulate")
    sim.add_argument("--out", default="runs/simulate")
    sim.set_defaults(func=_simulate)

    study = sub.add_parser("study", help="one section of the large-batch study, resumable (see adasum.lab.study)",
                           description="Runs a section until its plan is complete: every combiner tuned on one "
                                       "learning-rate axis at every E (widened while a best rate sits at an end; more "
                                       "seeds at the best rates), and the recipe reading at fixed hyperparameters. "
                                       "Writes protocol.md, tuned.md and recipe.md (verdicts with 95% bootstrap "
                                       "intervals), orthogonality.md, the plots, and runs/<id>.json per run; a rerun "
                                       "continues where an interrupted one stopped.")
    study.add_argument("name", help="convex, momentum, adam, lamb, elastic, gauss-logistic or teacher-mlp "
                                    "(see adasum.lab.sections)")
    study.add_argument("--scale", default="cpu", help="cpu (a laptop's grid) or gpu (the study proper; use --device cuda)")
    study.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    study.add_argument("--worker-chunk", type=int, help="as for simulate")
    study.add_argument("--out", help="runs/ and the report go here (default runs/study/NAME-SCALE)")
    study.add_argument("--no-progress", action="store_true", help="no progress bar")
    study.set_defaults(func=_study)

    _add_noise_parser(sub)

    bench = sub.add_parser("bench", help="run a benchmark script of the source checkout")
    bench.add_argument("which", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="digits on 4 worker processes, Adasum against averaging")
    demo.add_argument("--nproc", type=int, default=4)
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, TaskError) as e:
        print(f"adasum: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except (WorkerError, TimeoutError) as e:  # spawn's message names the rank (and signal)
        print(f"adasum: error: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt as e:
        print(f"adasum: interrupted{f'; {e}' if isinstance(e, _Interrupted) else ''}", file=sys.stderr)
        return INTERRUPTED


def _output_dir(path: str) -> Path:
    """``--out``, created now and known to be writable: otherwise the run would fail where it
    first saves, after an epoch of training."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {path!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ConfigError(f"cannot write to --out {path!r}: {e.strerror}") from None
    return out


def _config(args: argparse.Namespace, **run) -> RunConfig:
    return RunConfig(
        task=args.task, data=args.data, samples=args.samples, schedule=args.schedule,
        warmup=args.warmup, epochs=args.epochs, seed=args.seed, target=args.target,
        evals_per_epoch=args.evals_per_epoch, **run,
    ).validated()


# ----------------------------------------------------------------------------------- train

def _torchrun_world() -> tuple[int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _train(args: argparse.Namespace) -> int:
    from adasum.lab.train import CHECKPOINT, train_worker
    from adasum.launch import spawn

    config = _config(args, reducer=args.reducer, optimizer=args.optimizer, mode=args.mode, lr=args.lr,
                     batch=args.batch, accum=args.accum)
    launched = _torchrun_world()
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if launched and args.nproc not in (None, launched[1]):
        raise ConfigError(f"--nproc {args.nproc} disagrees with torchrun's world size {launched[1]}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    workers = launched[1] if launched else (args.nproc or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", workers)) if launched else workers
    _check_run(config, workers, local, args.resume)
    checkpoint = _output_dir(args.out) / CHECKPOINT
    before = _file_id(checkpoint)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if launched:
            result = _run_under_torchrun(train_worker, launched, config, args, progress)
        else:
            result = spawn(train_worker, workers, config, args.out, args.resume, progress,
                           timeout=args.timeout)[0]
    except KeyboardInterrupt:
        # A checkpoint replaced since the start is this run's; else the one it resumed from.
        if _file_id(checkpoint) not in (None, before):
            raise _Interrupted(f"last checkpoint: {checkpoint}") from None
        raise _Interrupted(f"last checkpoint: {args.resume}" if args.resume else "no checkpoint yet") from None
    if result is not None:
        _print_summaries([result["summary"]])
        print(f"history and checkpoint in {args.out}/")
    return 0


def _check_run(config: RunConfig, workers: int, local: int, resume: str | None) -> None:
    """Everything a worker would find wrong at its start, found here before any starts: the
    data, the step size against it, and the checkpoint to resume from. ``local`` workers of
    this machine each build the task; this process's copy is gone when the check returns."""
    from adasum.lab.train import check_resume

    task = load_task(config.task, config.data, config.samples, copies=local)
    Steps(config, workers, task.train_size)
    if resume is not None:
        check_resume(resume, config, workers, task.build_model(config.seed))


def _file_id(path: Path) -> tuple[int, int] | None:
    """Inode and modification time: a checkpoint is replaced (renamed over), never rewritten."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _run_under_torchrun(worker: Callable, launched: tuple[int, int], config: RunConfig,
                        args: argparse.Namespace, progress: bool):
    import torch
    import torch.distributed as dist

    rank, world = launched
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("gloo")
    try:
        return worker(rank, world, config, args.out, args.resume, progress)
    finally:
        dist.destroy_process_group()


_SUMMARY_COLUMNS = ("reducer", "optimizer", "workers", "examples_per_step", "lr", "steps",
                    "train_loss", "test_loss", "score", "steps_to_target", "epochs_to_target",
                    "noise_scale")


def _print_summaries(summaries: Sequence[dict]) -> None:
    from adasum.lab.report import markdown_table

    print(markdown_table(summaries, _SUMMARY_COLUMNS), end="")


# -------------------------------------------------------------------------------- simulate

def _simulate(args: argparse.Namespace) -> int:
    from adasum.lab.records import write_csv
    from adasum.lab.report import markdown_table, write_report
    from adasum.lab.simulate import geometry, resolve_device, sweep

    if not args.workers or min(args.workers) < 1:
        raise ConfigError(f"--workers must be positive, got {args.workers}")
    if args.geometry:
        out = _output_dir(args.out)
        rows = geometry(args.workers, [0.0, 0.25, 0.5, 0.75, 1.0])
        write_csv(rows, out / "geometry.csv")
        table = markdown_table(rows, list(rows[0]))
        (out / "geometry.md").write_text(table)
        print(table, end="")
        return 0
    if not args.lrs or not all(lr > 0 and math.isfinite(lr) for lr in args.lrs):
        raise ConfigError(f"every learning rate must be a positive number, got {args.lrs}")
    for name in ("batches", "accums"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}")
    device = resolve_device(args.device)
    base = _config(args, mode=args.mode, optimizer=args.optimizers[0], sync_every=args.sync_every,
                   outer=args.outer_optimizer, outer_lr=args.outer_lr)
    for name in args.optimizers[1:]:  # local SGD needs every one in delta mode: say so before the sweep
        base.with_(optimizer=name).validated()
    task = load_task(base.task, base.data, base.samples)
    Steps(base.with_(batch=min(args.batches), accum=min(args.accums)), min(args.workers), task.train_size)
    out = _output_dir(args.out)

    def report(summary: dict) -> None:
        print(f"  {summary['optimizer']}/{summary['reducer']} N={summary['workers']} "
              f"E={summary['examples_per_step']} lr={summary['lr']:g}: score {summary['score']:.4f}, "
              f"epochs to target {summary['epochs_to_target']}, noise scale {summary['noise_scale']:.4g}, "
              f"{summary['seconds_per_step']:.3g} s/step "
              f"({summary['device']}, {summary['worker_chunk']} workers per chunk"
              + (f", peak {summary['peak_gib']:.2f} GiB)" if "peak_gib" in summary else ")"), file=sys.stderr)

    summaries, curves = sweep(
        task, base, workers=args.workers, reducers=args.reducers, optimizers=args.optimizers,
        lrs=args.lrs, batches=args.batches, accums=args.accums,
        distances=not args.no_distances, on_run=report, device=device, worker_chunk=args.worker_chunk,
    )
    written = write_report(summaries, curves, out, args.title)
    _print_summaries(summaries)
    grid = (len(args.optimizers) * len(args.batches) * len(args.accums) * len(args.workers)
            * len(args.reducers) * len(args.lrs))
    skipped = f" ({grid - len(summaries)} skipped: a step needs more examples than the task has)" if grid > len(summaries) else ""
    print(f"{len(summaries)} runs{skipped}; wrote {', '.join(p.name for p in written)} to {out}/")
    return 0


# ----------------------------------------------------------------------------------- study

def _study(args: argparse.Namespace) -> int:
    from adasum.lab.sections import SECTIONS
    from adasum.lab.simulate import resolve_device
    from adasum.lab.study import run_study
    from adasum.lab.study_report import write_study_report

    if args.name not in SECTIONS:
        raise ConfigError(f"unknown study section {args.name!r} (choose from {', '.join(SECTIONS)})")
    section = SECTIONS[args.name]
    scale = section.scale(args.scale)
    resolve_device(args.device)
    if args.worker_chunk is not None and args.worker_chunk < 1:
        raise ConfigError(f"--worker-chunk must be at least 1, got {args.worker_chunk}")
    out = _output_dir(args.out or f"runs/study/{args.name}-{args.scale}")
    records, curves, ran = run_study(section, scale, out, device=args.device, worker_chunk=args.worker_chunk,
                                     progress=not args.no_progress and sys.stderr.isatty())
    title = f"{section.title} ({args.scale} scale, b_crit {scale.b_crit:g})"
    written = write_study_report(records, curves, out, title, scale, section.readings)
    for name in ("protocol", *section.readings):
        print((out / f"{name}.md").read_text())
    print(f"{len(records)} runs ({ran} new, {len(records) - ran} found in {out / 'runs'}); "
          f"wrote {', '.join(p.name for p in written)} to {out}/")
    return 0


# ----------------------------------------------------------------------------------- noise

def _add_noise_parser(sub) -> None:
    noise = sub.add_parser("noise", help="the gradient noise scale B_simple (critical batch) along one run")
    _add_run_options(noise)
    noise.add_argument("--optimizer", default="momentum", help="sgd or momentum (adam and lamb run in delta mode)")
    noise.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    noise.add_argument("--batch", type=int, default=1024, help="examples per step of the one worker (default 1024)")
    noise.add_argument("--workers", type=int, default=8,
                       help="simulated workers whose average is that worker (the second batch size; default 8)")
    noise.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    noise.add_argument("--worker-chunk", type=int, help="as for simulate")
    noise.add_argument("--levels", type=_list_of(float, "--levels"), default=[],
                       help="scores (comma-separated) at which to report B_simple too: candidate targets")
    noise.add_argument("--out", help="write the run's history.csv and summary.json here")
    noise.set_defaults(func=_noise)


def _noise(args: argparse.Namespace) -> int:
    from adasum.lab.critical import measure_noise, noise_report
    from adasum.lab.records import write_csv, write_json

    config = _config(args, optimizer=args.optimizer, lr=args.lr, batch=args.batch)
    task = load_task(config.task, config.data, config.samples)
    out = _output_dir(args.out) if args.out else None
    history, summary = measure_noise(task, config, args.workers, device=args.device,
                                     worker_chunk=args.worker_chunk, progress=sys.stderr.isatty())
    print("\n".join(noise_report(history, summary, args.levels)))
    if out is not None:
        write_csv(history, out / "history.csv")
        write_json(summary, out / "summary.json")
    return 0


# ----------------------------------------------------------------------------------- bench

def _bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/<script>`` of the source checkout (the benchmarks are not installed)."""
    script = Path(__file__).resolve().parents[3] / "benchmarks" / BENCHMARKS[args.which]
    if not script.is_file():
        raise ConfigError(f"benchmark {args.which!r} needs {script} (a source checkout)")
    return subprocess.call([sys.executable, str(script), *args.args])


# ------------------------------------------------------------------------------------ demo

#: Momentum SGD at the learning rate that suits one worker; Adasum needs no retuning for 4.
DEMO = RunConfig(task="digits-mlp", optimizer="momentum", lr=0.05, batch=32, target=0.95)


def _demo(args: argparse.Namespace) -> int:
    from adasum.lab.report import write_report
    from adasum.lab.train import train_worker
    from adasum.launch import spawn

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    out = _output_dir(args.out)
    summaries, curves = [], []
    for reducer in ("adasum", "average"):
        config = DEMO.with_(reducer=reducer, epochs=args.epochs).validated()
        print(f"training digits on {args.nproc} worker processes with {reducer} ...", file=sys.stderr)
        result = spawn(train_worker, args.nproc, config, str(out / reducer), None, False, timeout=600)[0]
        summaries.append({**result["summary"], "run": len(summaries)})
        curves.extend({"run": len(summaries) - 1, **r} for r in result["history"])
    write_report(summaries, curves, out, f"digits MLP, {args.nproc} workers, momentum lr {DEMO.lr}")
    _print_summaries(summaries)
    print(f"plot: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
