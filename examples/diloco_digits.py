"""DiLoCo with Adasum as the outer combiner: AdamW steps locally, every `sync_every` steps the
ranks' parameter deltas are combined with Adasum and a Nesterov outer step applies them.

    torchrun --standalone --nproc-per-node=4 examples/diloco_digits.py [--average]

Between synchronisations the ranks send nothing. At each synchronisation every rank's delta
(new parameters - parameters of the last synchronisation) goes through Adasum, per layer, in
bfloat16 on the wire; the outer SGD steps on the negated result from the synchronised
parameters, so outer momentum stays identical on every rank and AdamW's moments stay per rank.
`--average` averages the deltas instead, which is DiLoCo as published.
"""

import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits_data import batches, digits_split, init_distributed

import adasum
from adasum.optim import LocalSGD, broadcast_parameters

# ----------------------------------------------------------------------------- settings
epochs = 16
batch_size = 32  # per rank
sync_every = 8  # local AdamW steps between synchronisations
report_every = 4  # synchronisations
inner_lr = 2e-3
outer_lr, outer_momentum = 0.7, 0.9  # DiLoCo's outer Nesterov step
seed = 0

# ----------------------------------------------------------------------------- setup and data
rank, world = init_distributed(port=29513)
torch.manual_seed(seed + rank)  # different initialisations on purpose: the broadcast fixes it
x_train, y_train, x_test, y_test = digits_split(rank, world, seed)

# ----------------------------------------------------------------------------- model and optimizers
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)
)
broadcast_parameters(model)  # everyone starts from rank 0's parameters
optimizer = LocalSGD(
    torch.optim.AdamW(model.parameters(), lr=inner_lr, weight_decay=0.01),  # inner: per rank
    adasum.Average() if "--average" in sys.argv else adasum.Adasum(),
    sync_every=sync_every,
    outer=torch.optim.SGD(model.parameters(), lr=outer_lr, momentum=outer_momentum, nesterov=True),
    wire_dtype=torch.bfloat16,
    stats=True,
)

# ----------------------------------------------------------------------------- training
def stream():
    for epoch in range(epochs):
        yield from batches(x_train, y_train, batch_size, epoch, rank)


t0 = time.time()
for steps, (xb, yb) in enumerate(stream(), start=1):
    loss = F.cross_entropy(model(xb), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()  # a local AdamW step; every sync_every-th also synchronises
    if steps % (report_every * sync_every) == 0 and rank == 0:
        # Just synchronised: every rank holds these parameters (in between, each its own).
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        scale = optimizer.last_stats.summary().get("adasum/scale")  # absent when averaging
        shown = "" if scale is None else f"  adasum scale {scale:.3f} (0.5 = averaged, 1 = summed, >1 = partly opposed)"
        print(f"sync {steps // sync_every}: loss {loss.item():.4f}  test acc {acc:.3f}{shown}")

if rank == 0:
    print(f"{world} ranks, {steps} local steps, {steps // sync_every} synchronisations in {time.time() - t0:.1f} s")
dist.destroy_process_group()
