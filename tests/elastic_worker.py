"""One torchrun worker of tests/test_elastic.py: a training run that survives changes of world.

Run as ``torchrun --nnodes=1:2 --max-restarts=K ... tests/elastic_worker.py OUT STEPS``. Every
rank trains two copies of a small model side by side, one per mode: gradient mode (DDP with
:func:`adasum.ddp.adasum_hook`, momentum SGD on the reduced gradient) and delta mode
(:class:`adasum.optim.DistributedOptimizer` over Adam, each rank with its own moments). Every
step rank 0 writes ``OUT/checkpoint.pt`` atomically: the step, both models, the learning rate,
the gradient-mode optimizer's state (the same on every rank) and every rank's delta-mode state
(:meth:`~adasum.optim.DistributedOptimizer.gather_state_dicts`). A (re)started worker resumes
from it; in delta mode rank r of the new world takes old rank ``r mod N_old``'s state
(:meth:`~adasum.optim.DistributedOptimizer.load_state_dicts`).

What the test reads: ``OUT/boots.txt``, one line per start of rank 0 (when the process started,
when torch was imported, when the process group was up, the world size, the step it resumed
from, the restart count); ``OUT/progress.txt``, one line per step (step, world size, restart
count, time); ``OUT/final{RANK}.pt``, every rank's parameters and learning rates at the end.
While ``OUT/hold`` exists the ranks wait between steps (the test holds the run while an agent
joins).
"""

from __future__ import annotations

import time

BOOT = time.time()  # before torch is imported: the test reports where a restart's time goes

import os  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from adasum.ddp import AdasumState, adasum_hook  # noqa: E402
from adasum.optim import DistributedOptimizer  # noqa: E402
from adasum.optim._elastic import save_atomically  # noqa: E402

#: A dead peer shows at once as a closed connection; this bounds any other wait.
GROUP_TIMEOUT = 30
LR = 0.05
MOMENTUM = 0.9
#: Seconds each step lasts at least, so that the test can act in the middle of the run.
STEP_SECONDS = 0.1


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def loss_of(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s loss at ``step``: its own batch of 8 examples, drawn from both."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def held(out: Path) -> bool:
    """Whether the test holds the run; rank 0 decides for every rank."""
    flag = torch.tensor([float(dist.get_rank() == 0 and (out / "hold").exists())])
    dist.broadcast(flag, 0)
    return bool(flag.item())


def main(out: Path, steps: int) -> None:
    imported = time.time()
    dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT))
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    grad_model, delta_model = build_model(), build_model()
    ddp = DDP(grad_model)
    hook = AdasumState()
    ddp.register_comm_hook(hook, adasum_hook)
    sgd = torch.optim.SGD(grad_model.parameters(), lr=LR, momentum=MOMENTUM)
    adam = DistributedOptimizer(torch.optim.Adam(delta_model.parameters(), lr=LR))
    start, path = 0, out / "checkpoint.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        assert saved["lr"] == LR
        grad_model.load_state_dict(saved["gradient"])
        delta_model.load_state_dict(saved["delta"])
        sgd.load_state_dict(saved["sgd"])
        adam.load_state_dicts(saved["adam"])
        start = saved["step"]
    if rank == 0:
        with open(out / "boots.txt", "a") as f:
            f.write(f"{BOOT:.3f} {imported:.3f} {time.time():.3f} {world} {start} {restart}\n")
    step = start
    while step < steps:
        began = time.monotonic()
        if held(out):
            time.sleep(STEP_SECONDS)
            continue
        for opt, model in ((sgd, ddp), (adam, delta_model)):
            opt.zero_grad()
            loss_of(model, step, rank).backward()
            opt.step()
        step += 1
        states = adam.gather_state_dicts()
        if rank == 0:
            save_atomically({"step": step, "world": world, "lr": LR, "gradient": grad_model.state_dict(),
                             "delta": delta_model.state_dict(), "sgd": sgd.state_dict(), "adam": states}, path)
            with open(out / "progress.txt", "a") as f:
                f.write(f"{step} {world} {restart} {time.time():.3f}\n")
        time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - began)))
    hook.close()
    torch.save({"world": world, "step": step, "gradient": [p.detach() for p in grad_model.parameters()],
                "delta": [p.detach() for p in delta_model.parameters()],
                "lrs": [g["lr"] for opt in (sgd, adam) for g in opt.param_groups]}, out / f"final{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
