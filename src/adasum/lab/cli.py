"""The ``adasum`` program: ``train``, ``simulate``, ``study``, ``noise``, ``bench`` and ``demo``
(their options: :mod:`adasum.lab.options`).

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
from typing import NoReturn

from adasum.lab.config import ConfigError, RunConfig, Steps
from adasum.lab.options import BENCHMARKS, USAGE_ERROR, build_parser, config_from
from adasum.lab.task import TaskError
from adasum.lab.tasks import load_task
from adasum.launch import WorkerError

__all__ = ["main", "build_parser"]

FAILED = 1
#: 128 + SIGINT: what a shell reports for a program that Ctrl-C ended.
INTERRUPTED = 130


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying where the run's progress was saved."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adasum`` command on ``argv`` (default: the program's arguments); its exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    commands = {"train": _train, "simulate": _simulate, "study": _study, "noise": _noise, "bench": _bench,
                "demo": _demo}
    try:
        return commands[args.command](args)
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


# ----------------------------------------------------------------------------------- train

def _torchrun_world() -> tuple[int, int] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _train(args: argparse.Namespace) -> int:
    from adasum.lab.train import CHECKPOINT, train_worker
    from adasum.launch import spawn

    config = config_from(args)
    launched = _torchrun_world()
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if launched and args.nproc not in (None, launched[1]):
        raise ConfigError(f"--nproc {args.nproc} disagrees with torchrun's world size {launched[1]}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be 0 (epochs only) or more, got {args.checkpoint_every}")
    if args.auto_resume and args.resume:
        raise ConfigError("--auto-resume resumes from --out's checkpoint; give it or --resume, not both")
    workers = launched[1] if launched else (args.nproc or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", workers)) if launched else workers
    checkpoint = _output_dir(args.out) / CHECKPOINT
    resume = str(checkpoint) if args.auto_resume and checkpoint.exists() else args.resume
    note = _check_run(config, workers, local, resume)
    if note and (not launched or launched[0] == 0):
        print(f"adasum: {note}", file=sys.stderr)
    before = _file_id(checkpoint)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if launched:
            result = _run_under_torchrun(train_worker, launched, config, args, resume, progress)
        else:
            result = spawn(train_worker, workers, config, args.out, resume, progress, args.checkpoint_every,
                           timeout=args.timeout)[0]
    except KeyboardInterrupt:
        # A checkpoint replaced since the start is this run's; else the one it resumed from.
        if _file_id(checkpoint) not in (None, before):
            raise _Interrupted(f"last checkpoint: {checkpoint}") from None
        raise _Interrupted(f"last checkpoint: {resume}" if resume else "no checkpoint yet") from None
    if result is not None:
        _print_summaries([result["summary"]])
        print(f"history and checkpoint in {args.out}/")
    if launched:
        _exit_now(0)
    return 0


def _exit_now(code: int) -> NoReturn:
    """End a torchrun worker without the interpreter's shutdown, as multiprocessing ends the
    workers of ``--nproc``: a Gloo thread that frees tensors during the shutdown is made to exit
    and the process aborts ("terminate called without an active exception"; docs/failures.md,
    "A finished job aborts at exit"). Every file the run writes is closed by now; the standard
    streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_run(config: RunConfig, workers: int, local: int, resume: str | None) -> str | None:
    """Everything a worker would find wrong at its start, found here before any starts: the
    data, the step size against it, and the checkpoint to resume from; returns what resuming
    on ``workers`` workers changes (None: nothing). ``local`` workers of this machine each
    build the task; this process's copy is gone when the check returns."""
    from adasum.lab.resume import plan_run
    from adasum.lab.train import check_resume

    task = load_task(config.task, config.data, config.samples, copies=local)
    Steps(config, workers, task.train_size)
    if resume is None:
        return None
    return plan_run(config, workers, task.train_size,
                    check_resume(resume, config, task.build_model(config.seed))).note


def _file_id(path: Path) -> tuple[int, int] | None:
    """Inode and modification time: a checkpoint is replaced (renamed over), never rewritten."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _run_under_torchrun(worker: Callable, launched: tuple[int, int], config: RunConfig,
                        args: argparse.Namespace, resume: str | None, progress: bool):
    import torch
    import torch.distributed as dist

    rank, world = launched
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("gloo")
    try:
        return worker(rank, world, config, args.out, resume, progress, args.checkpoint_every)
    finally:
        dist.destroy_process_group()


_SUMMARY_COLUMNS = ("reducer", "optimizer", "workers", "examples_per_step", "lr", "steps",
                    "train_loss", "test_loss", "score", "target", "steps_to_target", "epochs_to_target",
                    "noise_scale")


def _print_summaries(summaries: Sequence[dict]) -> None:
    from adasum.lab.report import runs_table

    print(runs_table(summaries, _SUMMARY_COLUMNS), end="")


# -------------------------------------------------------------------------------- simulate

def _simulate(args: argparse.Namespace) -> int:
    from adasum.lab.device import resolve_device
    from adasum.lab.report import reached, write_report
    from adasum.lab.simulate import sweep

    if not args.workers or min(args.workers) < 1:
        raise ConfigError(f"--workers must be positive, got {args.workers}")
    if args.geometry:
        return _geometry(args.workers, _output_dir(args.out))
    lists = {"--lrs": args.lrs, "--batches": args.batches, "--accums": args.accums}
    for flag, values in lists.items():
        if not values:
            raise ConfigError(f"{flag} needs at least one value")
    device = resolve_device(args.device)
    base = config_from(args, optimizer=args.optimizers[0])
    # Every value of every list is a run's option: RunConfig's own validation checks each, and
    # says before the sweep that an optimizer of the list cannot run local SGD.
    for option, values in zip(("lr", "batch", "accum", "optimizer"), (*lists.values(), args.optimizers)):
        for value in values:
            base.with_(**{option: value}).validated()
    task = load_task(base.task, base.data, base.samples)
    Steps(base.with_(batch=min(args.batches), accum=min(args.accums)), min(args.workers), task.train_size)
    out = _output_dir(args.out)

    def report(summary: dict) -> None:
        print(f"  {summary['optimizer']}/{summary['reducer']} N={summary['workers']} "
              f"E={summary['examples_per_step']} lr={summary['lr']:g}: {summary['metric']} {summary['score']:.4f}, "
              f"{reached(summary)}, noise scale {summary['noise_scale']:.4g}, "
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


def _geometry(workers: Sequence[int], out: Path) -> int:
    """``simulate --geometry``: the table of :func:`adasum.lab.geometry.geometry`, written and printed."""
    from adasum.lab.geometry import geometry
    from adasum.lab.records import write_csv
    from adasum.lab.report import markdown_table

    rows = geometry(workers, [0.0, 0.25, 0.5, 0.75, 1.0])
    write_csv(rows, out / "geometry.csv")
    table = markdown_table(rows, list(rows[0]))
    (out / "geometry.md").write_text(table)
    print(table, end="")
    return 0


# ----------------------------------------------------------------------------------- study

def _study(args: argparse.Namespace) -> int:
    from adasum.lab.device import resolve_device
    from adasum.lab.diloco import LOCAL_SECTIONS

    resolve_device(args.device)
    if args.worker_chunk is not None and args.worker_chunk < 1:
        raise ConfigError(f"--worker-chunk must be at least 1, got {args.worker_chunk}")
    out = _output_dir(args.out or f"runs/study/{args.name}-{args.scale}")
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if args.name in LOCAL_SECTIONS:
            return _local_study(args, out, progress)
        return _section_study(args, out, progress)
    except KeyboardInterrupt:
        raise _Interrupted(f"the finished runs are kept in {out / 'runs'}; the same command continues "
                           "from them") from None


def _section_study(args: argparse.Namespace, out: Path, progress: bool) -> int:
    """``adasum study NAME`` for a section of :mod:`adasum.lab.sections`."""
    from adasum.lab.sections import SECTIONS
    from adasum.lab.study import run_study
    from adasum.lab.study_report import write_study_report

    section = SECTIONS[args.name]
    scale = section.scale(args.scale)
    records, curves, ran = run_study(section, scale, out, device=args.device, worker_chunk=args.worker_chunk,
                                     progress=progress)
    title = f"{section.title} ({args.scale} scale, b_crit {scale.b_crit:g})"
    written = write_study_report(records, curves, out, title, scale, section.readings)
    for name in ("protocol", *section.readings):
        print((out / f"{name}.md").read_text())
    _print_study_end(records, ran, out, written)
    return 0


def _local_study(args: argparse.Namespace, out: Path, progress: bool) -> int:
    """``adasum study diloco``: a local SGD section (:mod:`adasum.lab.diloco`)."""
    from adasum.lab.diloco import LOCAL_SECTIONS, run_local_study
    from adasum.lab.diloco_report import write_local_report

    section = LOCAL_SECTIONS[args.name]
    scale = section.scale(args.scale)
    records, curves, ran = run_local_study(section, scale, out, device=args.device, worker_chunk=args.worker_chunk,
                                           progress=progress)
    written = write_local_report(records, curves, out, f"{section.title} ({args.scale} scale)", scale)
    print((out / "diloco.md").read_text())
    _print_study_end(records, ran, out, written)
    return 0


def _print_study_end(records: Sequence[dict], ran: int, out: Path, written: Sequence[Path]) -> None:
    print(f"{len(records)} runs ({ran} new, {len(records) - ran} found in {out / 'runs'}); "
          f"wrote {', '.join(p.name for p in written)} to {out}/")


# ----------------------------------------------------------------------------------- noise

def _noise(args: argparse.Namespace) -> int:
    from adasum.lab.critical import measure_noise, noise_report
    from adasum.lab.records import write_csv, write_json

    config = config_from(args)
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
    summaries: list[dict] = []
    curves: list[dict] = []
    for reducer in ("adasum", "average"):
        config = DEMO.with_(reducer=reducer, epochs=args.epochs).validated()
        print(f"training digits on {args.nproc} worker processes with {reducer} ...", file=sys.stderr)
        result = spawn(train_worker, args.nproc, config, str(out / reducer), None, False, timeout=600)[0]
        summaries.append({**result["summary"], "run": len(summaries)})
        curves.extend({"run": len(summaries) - 1, **r} for r in result["history"])
    write_report(summaries, curves, out,
                 f"digits MLP, {args.nproc} workers, momentum lr {DEMO.lr}, target test accuracy {DEMO.target:g}")
    _print_summaries(summaries)
    print(f"plot: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
