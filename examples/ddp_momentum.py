"""Gradient mode: DistributedDataParallel with the Adasum communication hook and momentum SGD.

    torchrun --standalone --nproc-per-node=4 examples/ddp_momentum.py

Each rank trains on its own quarter of scikit-learn's digits (8x8 images, 10 classes). The only
Adasum-specific lines are the two marked below; the rest is an ordinary DDP loop.
"""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits_data import batches, digits_split, init_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from adasum.ddp import AdasumState, adasum_hook

# ----------------------------------------------------------------------------- settings
epochs = 8
batch_size = 32  # per rank
lr = 0.05  # the single-rank learning rate: Adasum does not divide by the world size
momentum = 0.9
seed = 0

# ----------------------------------------------------------------------------- setup and data
rank, world = init_distributed(port=29511)
torch.manual_seed(seed)
x_train, y_train, x_test, y_test = digits_split(rank, world, seed)

# ----------------------------------------------------------------------------- model
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
)
model = DDP(model)  # broadcasts rank 0's parameters to everyone
state = AdasumState(stats=True, named_parameters=model.module.named_parameters())  # Adasum (1/2)
model.register_comm_hook(state, adasum_hook)  # Adasum (2/2)
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

# ----------------------------------------------------------------------------- training
t0 = time.time()
steps_per_epoch = len(x_train) // batch_size
for epoch in range(epochs):
    for xb, yb in batches(x_train, y_train, batch_size, epoch, rank):
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the hook combines the gradients here
        optimizer.step()
    with torch.no_grad():
        acc = (model.module(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        scale = state.last_stats.summary().get("adasum/scale", float("nan"))
        print(f"epoch {epoch}: loss {loss.item():.4f}  test acc {acc:.3f}  "
              f"adasum scale {scale:.3f} (0.5 = averaged, 1 = summed, >1 = partly opposed)")

if rank == 0:
    print(f"{world} ranks, {epochs * steps_per_epoch} steps in {time.time() - t0:.1f} s")
state.close()  # ends the hook's background thread and frees its process group
dist.destroy_process_group()
