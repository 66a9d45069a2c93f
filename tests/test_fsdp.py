"""Adasum under FSDP2 on real Gloo groups: the sharded reduce-scatter against adasum.reduce of
every rank's full gradients, for 2, 3 and 4 ranks, and a short training run equal to DDP with
the Adasum hook on the same data."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import adasum
import adasum._sharded
from adasum.ddp import AdasumState, adasum_hook
from adasum.fsdp import use_adasum
from adasum.launch import spawn
from conftest import TIMEOUT, rel_err

NUMELS = [5, 0, 12, 3]  # one row's segments: parameters' padded shards


def _rows(rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(40 + rank)
    return torch.randn(world * sum(NUMELS), generator=g, dtype=torch.float64)


def _scatter(rank: int, world: int) -> torch.Tensor:
    out = torch.empty(sum(NUMELS), dtype=torch.float64)
    from adasum._buffers import Buffers

    rows = _rows(rank, world)
    before = rows.clone()
    adasum._sharded.reduce_scatter(out, rows, NUMELS, None, Buffers())
    assert torch.equal(rows, before)
    return out


def _by_parameter(flat: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Rows of segments -> each parameter's full vector (its segments of every row)."""
    rows = flat.view(world, -1).split(NUMELS, dim=1)
    return [segment.reshape(-1) for segment in rows]


@pytest.mark.parametrize("world", [2, 3, 4, 5, 6])
def test_sharded_reduce_scatter_is_each_ranks_shard_of_the_adasum(world):
    outputs = spawn(_scatter, world, timeout=TIMEOUT)
    reduced = adasum.reduce([_by_parameter(_rows(r, world), world) for r in range(world)])
    for rank, out in enumerate(outputs):
        expected = torch.cat([p.view(world, -1)[rank] for p in reduced])
        assert rel_err(out, expected) <= 1e-12, rank


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(7, 10)  # 70 weights: padded to a multiple of the world size
        self.b = torch.nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)


def _model_and_local_gradients(rank: int) -> tuple[Net, list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The model every rank starts from, this rank's local gradients of it (a plain copy's) and
    the batch they came from."""
    torch.manual_seed(0)
    model = Net()
    local = Net()
    local.load_state_dict(model.state_dict())
    x, y = _data(rank, 0)
    torch.nn.functional.mse_loss(local(x), y).backward()
    return model, [p.grad.clone() for p in local.parameters()], (x, y)


def assert_shards(shards: list[torch.Tensor], full: list[torch.Tensor], index: int, parts: int, tol: float) -> None:
    """Each shard is part ``index`` of ``parts`` of the full tensor along dim 0, as FSDP cuts
    it: ceil(size / parts) rows each, the last ones shorter or empty."""
    for shard, whole in zip(shards, full):
        rows = -(-whole.shape[0] // parts)
        expected = whole[index * rows : (index + 1) * rows]
        assert shard.shape == expected.shape and shard.dtype == torch.float32
        assert rel_err(shard, expected) <= tol if expected.numel() else shard.numel() == 0


def _fsdp_grads(rank: int, world: int, reduce_dtype: torch.dtype | None = None) -> dict:
    model, local, (x, y) = _model_and_local_gradients(rank)
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    fully_shard(model.a, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    use_adasum(model)
    torch.nn.functional.mse_loss(model(x), y).backward()
    shards = [p.grad.to_local().clone() for p in model.parameters()]
    errors = {}
    unsupported = Net()
    fully_shard(unsupported, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float8_e4m3fn))
    for name, call in {"twice": lambda: use_adasum(model), "plain": lambda: use_adasum(Net()),
                       "policy": lambda: use_adasum(unsupported)}.items():
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    return {"local": local, "shards": shards, "errors": errors}


@pytest.mark.parametrize("world,reduce_dtype", [(2, None), (3, None), (4, None), (3, torch.bfloat16), (2, torch.float64)])
def test_fsdp_gradient_shards_equal_the_adasum_of_local_gradients(world, reduce_dtype):
    results = spawn(_fsdp_grads, world, reduce_dtype, timeout=TIMEOUT)
    # In a reduce dtype, the reference reduces the local gradients cast to it.
    dtype = reduce_dtype or torch.float32
    reduced = adasum.reduce([[g.to(dtype) for g in r["local"]] for r in results])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    for rank, res in enumerate(results):
        assert_shards(res["shards"], reduced, rank, world, tol)
        assert res["errors"]["twice"] == "adasum: rank 0: adasum.fsdp.use_adasum was already called on this model"
        assert res["errors"]["plain"] == (
            "adasum: rank 0: adasum.fsdp.use_adasum needs a model with fully_shard applied to it")
        assert res["errors"]["policy"].startswith(
            "adasum: rank 0: adasum.fsdp: reduce_dtype torch.float8_e4m3fn is not supported")


def _train_fsdp(rank: int, world: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Net()
    fully_shard(model.a)
    fully_shard(model)
    use_adasum(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        if step == 1:  # accumulate two micro-batches
            model.set_requires_gradient_sync(False)
            x, y = _data(rank, 10 + step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            model.set_requires_gradient_sync(True)
        x, y = _data(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().clone() for p in model.parameters()]


def _train_ddp_accumulating(rank: int, world: int) -> list[torch.Tensor]:
    """The same steps and data as :func:`_train_fsdp`, with DDP and the Adasum hook."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Net())
    model.register_comm_hook(AdasumState(), adasum_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        if step == 1:
            with model.no_sync():
                x, y = _data(rank, 10 + step)
                torch.nn.functional.mse_loss(model(x), y).backward()
        x, y = _data(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_training_under_fsdp_equals_ddp_with_the_hook():
    fsdp = spawn(_train_fsdp, 3, timeout=TIMEOUT)
    ddp = spawn(_train_ddp_accumulating, 3, timeout=TIMEOUT)
    for a, b in zip(fsdp[0], ddp[0]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for r in fsdp[1:]:
        assert all(torch.equal(a, b) for a, b in zip(fsdp[0], r))


def _hsdp_grads(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model, local, (x, y) = _model_and_local_gradients(rank)
    fully_shard(model.a, mesh=mesh)
    fully_shard(model, mesh=mesh)
    use_adasum(model)
    for _ in range(2):  # twice: the second backward reuses what the first set up
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
    return {"local": local, "shards": [p.grad.to_local().clone() for p in model.parameters()],
            "shard_rank": mesh["shard"].get_local_rank()}


@pytest.mark.parametrize("world", [4, 6])
def test_hsdp_averages_in_the_shard_group_and_applies_adasum_across_replicas(world):
    results = spawn(_hsdp_grads, world, timeout=TIMEOUT)
    shards = world // 2
    # Ranks 0..S-1 form replica 0's shard group: the node average, then Adasum across replicas.
    reduced = adasum.Hierarchical(shards).reduce([r["local"] for r in results])
    for res in results:
        assert_shards(res["shards"], reduced, res["shard_rank"], shards, 1e-6)
