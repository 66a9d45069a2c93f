"""One torchrun worker of tests/test_horovod_elastic.py: Horovod's elastic API on adasum.horovod.

Run as ``torchrun --nnodes=1:2 ... tests/horovod_elastic_worker.py OUT STEPS`` with
``ADASUM_ELASTIC_DIR`` set. A small model trains with ``hvd.DistributedOptimizer(op=hvd.Adasum)``
(delta mode: every rank's Adam moments are its own) on generated data through an
``ElasticSampler``, committing after every step. Rank 0 appends to ``OUT/boots.txt`` one line per
start of the training function (the step it starts from, the world size, torchrun's restart
count, the time, the time the process started) and to ``OUT/progress.txt`` one line per step (step, world size, restart count,
time); at the end every rank writes ``OUT/final{RANK}.pt``.
"""

from __future__ import annotations

import time

BEGAN = time.time()  # before torch is imported: the test reports where a restart's time goes

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import adasum.horovod as hvd  # noqa: E402

#: Seconds each step lasts at least, so that the test can act in the middle of the run.
STEP_SECONDS = 0.1
BATCH = 4


def _rows(path: Path) -> list[tuple]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(s), int(w), int(r), *map(float, times)) for s, w, r, *times in (line.split() for line in lines)]


def progress(out: Path) -> list[tuple]:
    """(step, world size, restart count, time) of every step rank 0 logged."""
    return _rows(out / "progress.txt")


def boots(out: Path) -> list[tuple]:
    """(step started from, world size, restart count, time, process start) of every start."""
    return _rows(out / "boots.txt")


def log(path: Path, step: int, *extra: float) -> None:
    if hvd.rank() == 0:
        with open(path, "a") as f:
            f.write(" ".join([str(step), str(hvd.size()), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
                              *(f"{t:.3f}" for t in (time.time(), *extra))]) + "\n")


def main(out: Path, steps: int) -> None:
    hvd.init()
    torch.manual_seed(hvd.rank())  # different initialisations: the state's sync equalises them
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                                         named_parameters=model.named_parameters(), op=hvd.Adasum)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 6, generator=g), torch.randn(256, 1, generator=g))
    sampler = hvd.elastic.ElasticSampler(data, seed=1)
    state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, step=0, epoch=0)

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        log(out / "boots.txt", state.step, BEGAN)
        while state.step < steps:
            for b, (x, y) in enumerate(torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=state.sampler)):
                began = time.monotonic()
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                state.sampler.record_batch(b, BATCH)
                state.step += 1
                state.commit()
                log(out / "progress.txt", state.step)
                time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - began)))
                if state.step == steps:
                    return
            state.epoch += 1
            state.sampler.set_epoch(state.epoch)

    train(state)
    torch.save({"step": state.step, "world": hvd.size(), "params": [p.detach() for p in model.parameters()]},
               out / f"final{hvd.rank()}.pt")
    hvd.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
