"""Delta mode: Adam on every rank, parameter updates combined with Adasum; bfloat16 autocast and
gradient clipping.

    torchrun --standalone --nproc-per-node=4 examples/adam_delta_bf16.py

Every rank runs its own Adam step on its own (clipped) gradients; DistributedOptimizer then
replaces the parameters by start + Adasum(all ranks' updates). Adam's moments stay per rank.
No DDP: the model is a plain module, made identical on all ranks once at the start.
"""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits_data import batches, digits_split, init_distributed

from adasum.optim import DistributedOptimizer, broadcast_parameters

# ----------------------------------------------------------------------------- settings
epochs = 8
batch_size = 32  # per rank
accumulation = 2  # backward passes per update
lr = 2e-3
max_grad_norm = 1.0
seed = 0

# ----------------------------------------------------------------------------- setup and data
rank, world = init_distributed(port=29512)
torch.manual_seed(seed + rank)  # different initialisations on purpose: the broadcast fixes it
x_train, y_train, x_test, y_test = digits_split(rank, world, seed)

# ----------------------------------------------------------------------------- model and optimizer
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)
)
broadcast_parameters(model)  # everyone starts from rank 0's parameters
optimizer = DistributedOptimizer(
    torch.optim.Adam(model.parameters(), lr=lr),
    backward_passes_per_step=accumulation,
    stats=True,
)

# ----------------------------------------------------------------------------- training
t0 = time.time()
steps_per_epoch = len(x_train) // batch_size
for epoch in range(epochs):
    for xb, yb in batches(x_train, y_train, batch_size, epoch, rank):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb) / accumulation
        optimizer.zero_grad(set_to_none=True)  # no-op until `accumulation` passes were stepped
        loss.backward()
        if optimizer.ready:  # the last pass of the cycle: clip the accumulated local gradient
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()  # local Adam step, then Adasum of the updates across ranks
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        scale = optimizer.last_stats.summary().get("adasum/scale", float("nan"))
        print(f"epoch {epoch}: loss {accumulation * loss.item():.4f}  test acc {acc:.3f}  "
              f"adasum scale {scale:.3f} (0.5 = averaged, 1 = summed, >1 = partly opposed)")

if rank == 0:
    print(f"{world} ranks, {epochs * steps_per_epoch // accumulation} updates in {time.time() - t0:.1f} s")
dist.destroy_process_group()
