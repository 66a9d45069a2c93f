"""Horovod's elastic synthetic benchmark on ``adasum.horovod``: two torchrun agents, one killed.

    python scripts/horovod_elastic_benchmark.py HOROVOD [--kill-after 8] [--num-iters 20] [--use-adasum]

HOROVOD is a Horovod source checkout or sdist (a directory or a .tar.gz); nothing is
downloaded. ``examples/elastic/pytorch/pytorch_synthetic_benchmark_elastic.py`` is copied to a
temporary directory (never into this repository) with two lines changed: ``import horovod.torch
as hvd`` becomes ``import adasum.horovod as hvd``, and ``from torchvision import models`` (not
installed) becomes a local ``models.py`` with one small CNN (``--model small_cnn``). Two agents
(``torchrun --nnodes=1:2 --nproc-per-node=2``, c10d rendezvous on localhost,
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, ``ADASUM_ELASTIC_DIR`` in the temporary directory)
run it; once rank 0 has printed ``--kill-after`` iterations, the second agent and its workers
are killed with SIGKILL. The script prints what the agents printed (the workers' tracebacks
left out) and the seconds from the kill to the survivors' next iteration. docs/horovod.md
records a run.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from agents import agent_command, agent_env, end_agents, kill_tree, start_agent, wait_listening  # noqa: E402
from horovod_conformance import describe, horovod_root, rewrite_imports  # noqa: E402

from adasum.launch import free_port  # noqa: E402

EXAMPLE = "examples/elastic/pytorch/pytorch_synthetic_benchmark_elastic.py"
MODELS_PY = '''\
"""Stands in for torchvision.models (not installed): one small CNN on 224x224 images, 1000 classes."""
import torch


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 5, stride=4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 13 * 13, 1000))
'''
RDZV_CONF = "join_timeout=120,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=5"
#: Lines of the workers' tracebacks (torchrun prefixes each with the rank) and blank lines.
NOISE = re.compile(r"^(\[rank\d+\]:|\s*$)")


def stage(root: Path, work: Path) -> Path:
    text = rewrite_imports((root / EXAMPLE).read_text())
    text = text.replace("from torchvision import models\n", "import models\n")
    (work / "models.py").write_text(MODELS_PY)
    script = work / Path(EXAMPLE).name
    script.write_text(text)
    return script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("horovod", type=Path, help="a Horovod source checkout or sdist (.tar.gz)")
    parser.add_argument("--kill-after", type=int, default=8, help="iterations printed before the kill")
    parser.add_argument("--num-iters", type=int, default=20)
    parser.add_argument("--use-adasum", action="store_true")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the whole run may take")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        root = horovod_root(args.horovod.resolve(), work, EXAMPLE)
        script = stage(root, work)
        flags = ["--model", "small_cnn", "--batch-size", "8", "--num-warmup-batches", "1",
                 "--num-batches-per-iter", "2", "--num-iters", str(args.num_iters)]
        flags += ["--use-adasum"] if args.use_adasum else []
        port = free_port()
        cmd = agent_command("1:2", port, "horovod-elastic-benchmark", RDZV_CONF, 2, script, *flags)
        env = agent_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", ADASUM_ELASTIC_DIR=str(work / "commits"))
        logs = [work / "agent0.log", work / "agent1.log"]
        deadline = time.monotonic() + args.timeout
        procs = [start_agent(cmd, env, logs[0], work)]
        try:
            wait_listening(port, deadline)
            procs.append(start_agent(cmd, env, logs[1], work))
            while sum(log.read_text().count("Iter #") for log in logs) < args.kill_after:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise SystemExit("the job ended or ran out of time before the kill")
                time.sleep(0.05)
            kill_tree(procs[1].pid)
            killed, printed = time.monotonic(), sum(log.read_text().count("Iter #") for log in logs)
            while sum(log.read_text().count("Iter #") for log in logs) == printed and procs[0].poll() is None:
                time.sleep(0.05)
            resumed = time.monotonic() - killed
            code = procs[0].wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            end_agents(procs)
        print(f"{describe(root)}: {EXAMPLE} {' '.join(flags)}")
        for i, log in enumerate(logs):
            print(f"===== agent {i}{' (killed)' if i else ''}")
            print("\n".join(line for line in log.read_text().splitlines() if not NOISE.match(line)))
        print(f"===== the surviving agent exited with {code}; its workers printed their next iteration "
              f"{resumed:.1f} s after the kill")
        return code


if __name__ == "__main__":
    sys.exit(main())
