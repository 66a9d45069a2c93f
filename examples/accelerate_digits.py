"""Adasum under Hugging Face Accelerate: an MLP on scikit-learn's digits, momentum SGD, on the CPU.

    torchrun --standalone --nproc-per-node=2 examples/accelerate_digits.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_digits.py  # the same

Accelerate reads torchrun's environment. ``accelerate launch --multi_gpu`` is its torchrun-style
launcher and needs no GPU (``Accelerator(cpu=True)`` keeps the work on the CPU); ``accelerate
launch --cpu --num_processes 2`` starts several processes only through MPI (``--mpirun_hostfile``)
and otherwise runs ONE process.

With several processes ``accelerator.prepare`` returns the model wrapped in
DistributedDataParallel, and the Adasum hook goes onto that (Accelerate's
``DistributedDataParallelKwargs(comm_hook=...)`` takes only PyTorch's built-in hooks). The rest
is an ordinary Accelerate loop; Accelerate gives every process its part of each epoch.
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from digits_data import N_TEST, digits

from adasum.ddp import AdasumState, adasum_hook

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=8)
args = parser.parse_args()

# ----------------------------------------------------------------------------- settings
batch_size = 32  # per process
lr = 0.05  # the single-process learning rate: Adasum does not divide by the world size
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
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
state = AdasumState()
if accelerator.num_processes > 1:  # one process gets the plain module back: nothing to reduce
    model.register_comm_hook(state, adasum_hook)  # Adasum instead of DDP's averaging

# ----------------------------------------------------------------------------- training
for epoch in range(args.epochs):
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)  # the hook combines the gradients here
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[:N_TEST]).argmax(1) == y[:N_TEST]).float().mean().item()
    accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}  val acc {acc:.3f}")

state.close()  # ends the hook's background thread and frees its process group
accelerator.end_training()
