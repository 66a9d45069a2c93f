"""A Horovod training script whose only change is the import line.

    torchrun --standalone --nproc-per-node=3 examples/horovod_adasum.py --use-adasum

(Horovod: ``horovodrun -np 3 python examples/horovod_adasum.py --use-adasum``.) Each worker
fits a small MLP to its shard of a synthetic regression problem; with ``--use-adasum`` the
optimizer combines the workers' updates with Adasum (delta mode, any number of workers),
otherwise it averages their gradients. Rank 0 prints the averaged loss of the first and last
step, and every rank checks that the replicas ended identical.
"""

from __future__ import annotations

import argparse

import torch

import adasum.horovod as hvd  # was: import horovod.torch as hvd


def shard(rank: int, size: int, n: int = 960) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's rows of one fixed problem: y = tanh(x A) B + noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 16, generator=g)) @ torch.randn(16, 2, generator=g)
    y += 0.01 * torch.randn(n, 2, generator=g)
    return x[rank::size], y[rank::size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--use-adasum", action="store_true", help="combine updates with Adasum")
    parser.add_argument("--fp16-allreduce", action="store_true", help="compress gradients to float16")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(hvd.rank())  # different initialisations: the broadcast below equalises them
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))

    # Horovod's rule: averaging scales the learning rate with the workers, Adasum does not.
    lr_scaler = 1 if args.use_adasum else hvd.size()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), compression=compression,
        op=hvd.Adasum if args.use_adasum else hvd.Average,
    )

    x, y = shard(hvd.rank(), hvd.size())
    losses = []
    for step in range(args.steps):
        rows = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(x)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        optimizer.step()
        losses.append(hvd.allreduce(loss.detach(), name="loss").item())  # the workers' average

    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert len(set(hvd.allgather_object(checksum))) == 1, "the replicas differ"
    if hvd.rank() == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({hvd.size()} workers, "
              f"{'Adasum' if args.use_adasum else 'Average'})")
    hvd.shutdown()


if __name__ == "__main__":
    main()
