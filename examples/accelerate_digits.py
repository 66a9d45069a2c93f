"""Adasum under Hugging Face Accelerate: an MLP on scikit-learn's digits, on the CPU.

    torchrun --standalone --nproc-per-node=2 examples/accelerate_digits.py          # gradient mode, momentum SGD
    torchrun --standalone --nproc-per-node=2 examples/accelerate_digits.py --delta  # delta mode, Adam per rank
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_digits.py  # the same

Accelerate reads torchrun's environment. ``accelerate launch --multi_gpu`` is its torchrun-style
launcher and needs no GPU (``Accelerator(cpu=True)`` keeps the work on the CPU); ``accelerate
launch --cpu --num_processes 2`` starts several processes only through MPI (``--mpirun_hostfile``)
and otherwise runs ONE process.

With several processes ``accelerator.prepare`` returns the model wrapped in
DistributedDataParallel, and ``adasum.ddp.use_adasum`` puts Adasum on that, in the mode
the optimizer asks for: the gradients' Adasum for SGD, the Adasum of the ranks' updates for a
``DistributedOptimizer``. The rest is an ordinary Accelerate loop; Accelerate gives every process
its part of each epoch.
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from digits_data import N_TEST, digits

from adasum.ddp import use_adasum
from adasum.optim import DistributedOptimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--delta", action="store_true", help="delta mode (Adam per rank) instead of gradient mode (SGD)")
args = parser.parse_args()

# ----------------------------------------------------------------------------- settings
batch_size = 32  # per process
# The single-process learning rates: Adasum does not divide by the world size.
lr = 2e-3 if args.delta else 0.05
momentum = 0.9

# ----------------------------------------------------------------------------- setup and data
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
x, y = digits()
train = torch.utils.data.TensorDataset(x[N_TEST:], y[N_TEST:])
loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)

# ----------------------------------------------------------------------------- model
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
)
if args.delta:  # each rank steps its own Adam; the wrapper combines the updates
    optimizer = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=lr))
else:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
state = use_adasum(model, optimizer)  # Adasum instead of DDP's averaging

# ----------------------------------------------------------------------------- training
for epoch in range(args.epochs):
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)  # gradient mode: the hook combines the gradients here
        optimizer.step()  # delta mode: the local step, then the Adasum of the updates
    model.eval()
    with torch.no_grad():
        acc = (model(x[:N_TEST]).argmax(1) == y[:N_TEST]).float().mean().item()
    accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}  val acc {acc:.3f}")

if state is not None:
    state.close()  # ends the hook's background thread and frees its process group
accelerator.end_training()
