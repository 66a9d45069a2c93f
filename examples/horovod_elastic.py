"""Elastic training with Horovod's API: workers may be lost or added while the job runs.

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ADASUM_ELASTIC_DIR=/tmp/horovod-elastic-demo
    torchrun --nnodes=1:2 --nproc-per-node=2 --max-restarts=3 --rdzv-backend=c10d \\
        --rdzv-endpoint=localhost:29400 --rdzv-id=demo examples/horovod_elastic.py --use-adasum

Run the same command in a second terminal: a second "node" joins, and the job goes on with 4
workers. End one of them (Ctrl-C, or ``kill -9`` its torchrun): the job goes on with the other's
workers, from the last commit. (Horovod: ``horovodrun -np 4 --min-np 2 --max-np 4
--host-discovery-script ./discover.sh python horovod_elastic.py``.)

Each worker fits a small MLP to its batches of one synthetic regression problem; an
``ElasticSampler`` deals the batches out, so that after a change of workers the epoch goes on
with only the examples it has not seen. A new job in the same ``ADASUM_ELASTIC_DIR`` continues
from its last commit: delete the directory to start over.
"""

from __future__ import annotations

import argparse

import torch

import adasum.horovod as hvd  # was: import horovod.torch as hvd


def problem(n: int = 2048) -> torch.utils.data.TensorDataset:
    """One fixed problem, the same on every worker: y = tanh(x A) B + noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 16, generator=g)) @ torch.randn(16, 2, generator=g)
    return torch.utils.data.TensorDataset(x, y + 0.01 * torch.randn(n, 2, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--use-adasum", action="store_true", help="combine updates with Adasum")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batches-per-commit", type=int, default=4)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(hvd.rank())  # different initialisations: the state's sync equalises them
    data = problem()
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))

    # Horovod's rule: averaging scales the learning rate with the workers, Adasum does not.
    def lr_scaler() -> int:
        return 1 if args.use_adasum else hvd.size()

    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr * lr_scaler(), momentum=0.9),
        named_parameters=model.named_parameters(), op=hvd.Adasum if args.use_adasum else hvd.Average)
    sampler = hvd.elastic.ElasticSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler)

    # Everything a restarted worker continues from: what a commit saves.
    state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0, steps=0)

    def on_state_reset() -> None:
        """The workers restarted on a different world: rescale the learning rate."""
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_scaler()

    state.register_reset_callbacks([on_state_reset])

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        while state.epoch < args.epochs:
            for batch, (x, y) in enumerate(loader):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                sampler.record_batch(batch, args.batch_size)
                state.steps += 1
                if state.steps % args.batches_per_commit == 0:
                    state.commit()
            average = hvd.allreduce(loss.detach(), name="loss")
            if hvd.rank() == 0:
                print(f"epoch {state.epoch}: {hvd.size()} workers, {state.steps} steps, loss {average.item():.4f}")
            state.epoch += 1
            sampler.set_epoch(state.epoch)  # at the end of the epoch: clears the record of seen examples
            state.commit()

    train(state)

    # Every worker holds the same parameters.
    mine = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(hvd.broadcast(mine, root_rank=0), mine), "replicas differ"
    hvd.shutdown()


if __name__ == "__main__":
    main()
