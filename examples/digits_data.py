"""Shared by the examples: the process group and scikit-learn's digits split across ranks."""

import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

N_TEST = 297  # held out, the same on every rank


def init_distributed(port: int) -> tuple[int, int]:
    """Join torchrun's process group (Gloo), or make a world of one under plain `python`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # several ranks share the machine's cores
    return dist.get_rank(), dist.get_world_size()


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All of the digits, shuffled by ``seed``: 8x8 images scaled to [0, 1] (flattened to 64
    floats) and their labels, 10 classes. The first N_TEST are the held-out set."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def digits_split(rank: int, world: int, seed: int = 0):
    """(x_train, y_train) for this rank's shard and the common (x_test, y_test)."""
    x, y = digits(seed)
    return x[N_TEST + rank :: world], y[N_TEST + rank :: world], x[:N_TEST], y[:N_TEST]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, epoch: int, rank: int):
    """This epoch's full batches of (x, y) in an order of its own on every rank."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 * epoch + rank))
    for i in range(len(x) // batch_size):
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield x[idx], y[idx]
