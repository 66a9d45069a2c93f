"""Adasum on CUDA: the arithmetic against the CPU kernels, its memory against the half-buffer
target, the simulator, the DDP hook's stream order, and the front doors on NCCL.

Everything here skips without CUDA (at collection, so a CPU run spends no time here);
``scripts/gpu-check.sh`` runs it on a GPU machine. Multi-rank NCCL tests need one GPU per rank
(NCCL refuses two ranks on one GPU) and skip below two GPUs.
"""

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import adasum
from adasum import _ops as ops
from adasum.launch import spawn
from conftest import TIMEOUT, caught, rel_err, same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
multi_gpu = pytest.mark.skipif(GPUS < 2, reason="NCCL needs one GPU per rank: at least 2 GPUs")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-6, torch.float64: 1e-13}

if GPUS:  # the shared layouts and checks, and the measurement of bench_memory.py
    from test_chunked import LAYOUTS, assert_partials_close, operands

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_memory import TARGET, paths, peak_extra_bytes, steps


# -- the arithmetic -------------------------------------------------------------------------


PATHS = ["triton", "chunked"]


def _only(monkeypatch, path: str) -> None:
    """Makes CUDA buffers take ``path``: the Triton kernels (skipped where Triton is missing)
    or the chunked PyTorch ops."""
    if path == "triton" and not ops._triton.INSTALLED:
        pytest.skip("Triton not installed")
    if path == "chunked":
        monkeypatch.setattr(ops._triton, "available", lambda *tensors: False)


@pytest.mark.skipif(ops._kernels is None, reason="C kernels not built: nothing to compare with")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [*LAYOUTS, [3 << 20, 5, 0, 1 << 20]] if GPUS else [])
def test_cuda_arithmetic_against_the_cpu_kernels(monkeypatch, path, dtype, layout):
    _only(monkeypatch, path)
    a, b = operands(sum(layout), dtype, seed=len(layout))
    offsets = ops.offsets_of(layout)
    cpu_partials = ops.segment_partials(a, b, offsets)
    ca, cb = ops.coefficients(cpu_partials)
    cpu = torch.empty_like(a)
    ops.segment_combine(a, b, cpu, offsets, ca, cb)
    ga, gb = a.cuda(), b.cuda()
    assert ops._triton.available(ga, gb) == (path == "triton")  # the path under test serves them
    gpu_partials = ops.segment_partials(ga, gb, offsets)
    gpu = torch.empty_like(ga)
    ops.segment_combine(ga, gb, gpu, offsets, ca.cuda(), cb.cuda())
    nan = torch.isnan(cpu.double())
    assert torch.equal(nan, torch.isnan(gpu.cpu().double()))
    assert same_bits(gpu.cpu()[~nan], cpu[~nan])
    assert_partials_close(cpu_partials, gpu_partials.cpu(), a, b, layout)
    again = ops.segment_partials(ga, gb, offsets)
    assert same_bits(again, gpu_partials)  # deterministic on the GPU too


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numels", [[1 << 24], [1000] * 16777 + [216]], ids=["one", "many"])
def test_cuda_extra_memory_is_at_most_half_the_buffer(path, dtype, numels):
    a, b = (t.cuda() for t in operands(sum(numels), dtype, seed=3))
    if path not in paths(a.device):
        pytest.skip("Triton not installed")
    buffer = a.numel() * a.element_size()
    for step in steps(paths(a.device)[path], a, b, numels):
        assert peak_extra_bytes(step, a.device) <= TARGET * buffer


@pytest.mark.parametrize("dtype", DTYPES)
def test_simulator_on_cuda(dtype):
    g = torch.Generator().manual_seed(4)
    shapes = [(300, 40), (40,), (7, 7, 3), (1,)]
    per_rank = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(5)]
    on_cpu = adasum.reduce(per_rank)
    on_gpu = adasum.reduce([[t.cuda() for t in ts] for ts in per_rank])
    assert all(t.is_cuda for t in on_gpu)
    for x, ref in zip(on_gpu, on_cpu):
        assert rel_err(x.cpu(), ref) < TOL[dtype]


# -- the DDP hook's stream order on one GPU --------------------------------------------------


def test_background_work_waits_for_the_autograd_stream_and_ddp_for_it():
    from adasum.ddp import AdasumState, _future_for

    state = AdasumState()
    buffer = torch.zeros(1 << 22, device="cuda")
    torch.cuda._sleep(200_000_000)  # keeps the current stream busy well past the thread's start
    buffer.fill_(1.0)  # the "gradients", queued behind the sleep
    job = SimpleNamespace(buffer=buffer, ready=torch.cuda.Event())
    job.ready.record(torch.cuda.current_stream())
    future = _future_for(buffer)

    def run() -> None:  # what the hook's background thread does
        with state._ordered(job):
            assert torch.cuda.current_stream() != torch.cuda.default_stream()
            buffer.mul_(3.0)
            future.set_result(buffer)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    # Without the wait on ``ready`` the multiplication would run before the fill (result 1);
    # without the future's event the read below could run before the multiplication.
    assert torch.equal(future.wait(), torch.full_like(buffer, 3.0))


# -- the front doors on NCCL -----------------------------------------------------------------


def _on_gpu(rank: int) -> torch.device:
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 64)
        self.out = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


def _batch(rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(32, 16, generator=g).to(device), torch.randn(32, 4, generator=g).to(device)


def _hook_worker(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from adasum.ddp import AdasumState, adasum_hook

    device = _on_gpu(rank)
    torch.manual_seed(0)
    model = _Net().to(device)
    ddp = DDP(model, device_ids=[rank], bucket_cap_mb=0.001)  # several buckets
    state = AdasumState(stats=True)
    ddp.register_comm_hook(state, adasum_hook)
    x, y = _batch(rank, device)
    local = [g.cpu() for g in torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), model.parameters())]
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    combined = [p.grad.cpu() for p in model.parameters()]
    state.close()
    return {"local": local, "combined": combined, "stats": state.last_stats is not None}


def _optimizer_worker(rank: int, world: int) -> dict:
    from adasum.optim import DistributedOptimizer, broadcast_parameters

    device = _on_gpu(rank)
    torch.manual_seed(rank)  # different on every rank until the broadcast
    model = _Net().to(device)
    broadcast_parameters(model.parameters())
    start = [p.detach().cpu() for p in model.parameters()]
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01))
    x, y = _batch(rank, device)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.cpu() for p in model.parameters()]
    opt.step()
    return {"start": start, "grads": grads, "params": [p.detach().cpu() for p in model.parameters()]}


def _inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(s, generator=g).to(dtype) for s, dtype in
            [((1 << 20) + 3, torch.float32), ((512, 7), torch.bfloat16), ((9,), torch.float64), ((0,), torch.float32)]]


def _collective_worker(rank: int, world: int) -> list:
    device = _on_gpu(rank)
    tensors = [t.to(device) for t in _inputs(rank)]
    adasum.all_reduce(tensors)
    gloo = dist.new_group(backend="gloo")
    refused = caught(lambda: adasum.Adasum(gloo).all_reduce([torch.ones(3, device=device)]))
    return [t.cpu() for t in tensors] + [refused]


def test_hook_and_optimizer_on_one_rank_nccl():
    # World size 1: the identity, through every CUDA code path of the front doors.
    hook = spawn(_hook_worker, 1, backend="nccl", timeout=TIMEOUT)[0]
    assert same_bits(hook["combined"], hook["local"]) and hook["stats"]
    opt = spawn(_optimizer_worker, 1, backend="nccl", timeout=TIMEOUT)[0]
    plain = [p.clone().requires_grad_() for p in opt["start"]]
    for p, g in zip(plain, opt["grads"]):
        p.grad = g
    torch.optim.Adam(plain, lr=0.01).step()
    assert all(rel_err(p, q.detach()) < 1e-6 for p, q in zip(opt["params"], plain))


@multi_gpu
def test_hook_on_nccl_ranks():
    ranks = spawn(_hook_worker, 2, backend="nccl", timeout=TIMEOUT)
    expected = adasum.reduce([r["local"] for r in ranks])
    for r in ranks:
        assert same_bits(r["combined"], ranks[0]["combined"])
        assert all(rel_err(x, ref) < 1e-6 for x, ref in zip(r["combined"], expected))


@multi_gpu
def test_optimizer_on_nccl_ranks():
    ranks = spawn(_optimizer_worker, 2, backend="nccl", timeout=TIMEOUT)
    assert same_bits(ranks[0]["start"], ranks[1]["start"]) and same_bits(ranks[0]["params"], ranks[1]["params"])
    deltas = []
    for r in ranks:
        plain = [p.clone().requires_grad_() for p in r["start"]]
        for p, g in zip(plain, r["grads"]):
            p.grad = g
        torch.optim.Adam(plain, lr=0.01).step()
        deltas.append([p.detach() - s for p, s in zip(plain, r["start"])])
    expected = [s + d for s, d in zip(ranks[0]["start"], adasum.reduce(deltas))]
    assert all(rel_err(p, q) < 1e-5 for p, q in zip(ranks[0]["params"], expected))


@multi_gpu
@pytest.mark.parametrize("world", [w for w in (2, 3, 4) if w <= max(GPUS, 2)])
def test_collective_on_nccl_ranks(world):
    ranks = spawn(_collective_worker, world, backend="nccl", timeout=TIMEOUT)
    expected = adasum.reduce([_inputs(r) for r in range(world)])
    for r in ranks:
        assert same_bits(r[:-1], ranks[0][:-1])  # rule 5: every rank the same bits
        assert all(rel_err(x, ref) < TOL[x.dtype] for x, ref in zip(r[:-1], expected))
        assert r[-1].startswith("ValueError") and "carries cpu tensors" in r[-1]
