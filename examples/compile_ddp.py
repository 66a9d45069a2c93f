"""torch.compile of a DDP model with the Adasum hook: a small CNN on scikit-learn's digits.

    torchrun --standalone --nproc-per-node=2 examples/compile_ddp.py
    torchrun --standalone --nproc-per-node=2 examples/compile_ddp.py --backend aot_eager

The order: DDP, then the hook, then ``torch.compile`` of the DDP module. Dynamo's DDPOptimizer
(the default, ``torch._dynamo.config.optimize_ddp = "ddp_optimizer"``) splits the compiled graph
at DDP's bucket boundaries and leaves the backward's communication to DDP's reducer, which calls
the hook with each bucket exactly as in eager mode: the hook itself is not compiled. Not
supported: ``optimize_ddp = "python_reducer"`` (compiled autograd), which hands a hook one
``(grad, param)`` pair at a time to trace into the compiled backward instead of a bucket.

The default backend, inductor, needs a C++ compiler for the CPU; ``--backend aot_eager`` needs
none. Epoch 0's time includes the compilation.
"""

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from digits_data import batches, digits_split, init_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from adasum.ddp import AdasumState, adasum_hook

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", default="inductor", help="torch.compile backend")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--batch-size", type=int, default=32, help="per rank")
# The single-rank learning rate: Adasum does not divide by the world size.
parser.add_argument("--lr", type=float, default=0.05)
args = parser.parse_args()

# ----------------------------------------------------------------------------- setup and data
rank, world = init_distributed(port=29513)
torch.manual_seed(0)
x_train, y_train, x_test, y_test = digits_split(rank, world)
x_train, x_test = x_train.view(-1, 1, 8, 8), x_test.view(-1, 1, 8, 8)  # 1-channel 8x8 images

# ----------------------------------------------------------------------------- model
class CNN(torch.nn.Module):
    # A class of one's own, not a bare nn.Sequential: behind DDP's graph breaks Dynamo starts a
    # new frame at the wrapped module's forward, and it does not compile frames in torch's own
    # files (nn.Sequential.forward), so torch.compile(DDP(nn.Sequential(...))) runs eagerly.
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.out = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.out(x.flatten(1))


model = CNN()
ddp = DDP(model)  # broadcasts rank 0's parameters to everyone
state = AdasumState()
ddp.register_comm_hook(state, adasum_hook)  # Adasum instead of averaging, before compiling
compiled = torch.compile(ddp, backend=args.backend)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

# ----------------------------------------------------------------------------- training
for epoch in range(args.epochs):
    t0 = time.time()
    for xb, yb in batches(x_train, y_train, args.batch_size, epoch, rank):
        loss = F.cross_entropy(compiled(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP's reducer calls the hook here, as without compile
        optimizer.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:  # epoch 0 includes the compilation
        print(f"epoch {epoch}: loss {loss.item():.4f}  {time.time() - t0:.1f} s  test acc {acc:.3f}")

state.close()  # ends the hook's background thread and frees its process group
dist.destroy_process_group()
