"""Adasum under Ray Train: an MLP on scikit-learn's digits, a local Ray cluster of CPU workers.

    python examples/ray_digits.py                      # gradient mode: Adasum of the gradients, momentum SGD
    python examples/ray_digits.py --delta              # delta mode: Adam per rank, Adasum of the updates
    python examples/ray_digits.py --workers 4 --storage /tmp/ray-digits

(``pip install -e '.[ray]'``.) ``TorchTrainer`` starts the workers and their process group
(Gloo on the CPU); ``ray.train.torch.prepare_model`` wraps the model in DistributedDataParallel
and ``adasum.ddp.use_adasum`` puts Adasum on it, in the mode the optimizer asks for. Every
epoch rank 0 reports a checkpoint; with ``FailureConfig(max_failures=2)`` a worker that dies
makes Ray start a new worker group, which resumes from the last checkpoint it registered. In
delta mode the checkpoint holds every rank's optimizer state (Adam's moments are per rank),
one file per rank, and a resumed rank takes its own.
"""

import argparse
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from digits_data import N_TEST, digits

from adasum.ddp import use_adasum
from adasum.optim import DistributedOptimizer


def make_optimizer(model: torch.nn.Module, delta: bool) -> torch.optim.Optimizer:
    # The single-rank learning rates: Adasum does not divide by the world size.
    if delta:
        return DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=2e-3))
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> int:
    """Load the last registered checkpoint, if any; the epoch to start at."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / "model.pt")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(torch.load(Path(folder) / f"optimizer-{rank}.pt"))
    return saved["epoch"] + 1


def report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, rank: int, acc: float) -> None:
    """Every rank writes its optimizer state into its own folder; Ray merges the ranks' folders
    into one checkpoint, with rank 0's model."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(optimizer.state_dict(), Path(folder) / f"optimizer-{rank}.pt")
        if rank == 0:
            torch.save({"model": model.state_dict(), "epoch": epoch}, Path(folder) / "model.pt")
        ray.train.report({"epoch": epoch, "val_acc": acc}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop(config: dict) -> None:
    torch.set_num_threads(1)  # the workers share the machine's cores
    rank = ray.train.get_context().get_world_rank()
    x, y = digits()
    train = torch.utils.data.TensorDataset(x[N_TEST:], y[N_TEST:])
    loader = ray.train.torch.prepare_data_loader(  # gives every rank its part of each epoch
        torch.utils.data.DataLoader(train, batch_size=32, shuffle=True))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimizer = make_optimizer(net, config["delta"])
    start = resume(net, optimizer, rank)
    model = ray.train.torch.prepare_model(net)  # DDP: broadcasts rank 0's parameters
    state = use_adasum(model, optimizer)
    for epoch in range(start, config["epochs"]):
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()  # gradient mode: the hook combines the gradients
            optimizer.step()  # delta mode: the local step, then the Adasum of the updates
        model.eval()
        with torch.no_grad():
            acc = (net(x[:N_TEST]).argmax(1) == y[:N_TEST]).float().mean().item()
        report(net, optimizer, epoch, rank, acc)
    if state is not None:
        state.close()  # ends the hook's background thread and frees its process group


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delta", action="store_true", help="delta mode (Adam) instead of gradient mode (SGD)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--storage", type=Path, default=Path(tempfile.gettempdir()) / "ray-digits",
                        help="where Ray keeps the checkpoints")
    args = parser.parse_args()

    here = Path(__file__).resolve().parent
    ray.init(num_cpus=args.workers + 1, include_dashboard=False,  # one more for the controller
             runtime_env={"working_dir": str(here), "env_vars": {"OMP_NUM_THREADS": "1"}})
    trainer = ray.train.torch.TorchTrainer(
        train_loop, train_loop_config={"delta": args.delta, "epochs": args.epochs},
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=str(args.storage.resolve()), name="digits",
                                       failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    print(f"epoch {result.metrics['epoch']}: val acc {result.metrics['val_acc']:.3f}")
