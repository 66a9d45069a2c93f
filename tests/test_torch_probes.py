"""adasum._torch: every probe of a torch internal reads it on the installed torch, and raises
TorchInternalsError naming the internal and the torch version on an object that lacks it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from adasum import _torch
from adasum.launch import spawn
from conftest import TIMEOUT


def _probes(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {"timeout": _torch.backend_timeout(dist.group.WORLD).total_seconds()}
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fully_shard(model)
    groups = _torch.fsdp_param_groups(model)
    out["groups"] = [type(g).__name__ for g in groups]
    out["is_group"] = isinstance(groups[0], _torch.fsdp_api().FSDPParamGroup)
    out["reduce_scatter_group"] = dist.get_world_size(_torch.fsdp_reduce_scatter_group(groups[0]))
    out["comm"] = type(_torch.fsdp_reduce_scatter_comm(groups[0])).__name__
    out["hook"] = _torch.fsdp_all_reduce_hook(groups[0])
    return out


def test_every_probe_reads_the_installed_torch():
    (out,) = spawn(_probes, 1, timeout=TIMEOUT, group_timeout=37)
    assert out["timeout"] == 37
    assert out["groups"] == ["FSDPParamGroup"] and out["is_group"]
    assert out["reduce_scatter_group"] == 1 and out["comm"] and out["hook"] is None
    api = _torch.fsdp_api()
    assert {"ReduceScatter", "DefaultReduceScatter", "FSDPMeshInfo", "HSDPMeshInfo"} <= set(vars(api))


def test_the_scaler_probe_finds_the_flags_update_reads():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    scaler.step(optimizer)
    flags = _torch.scaler_found_inf_per_device(scaler, optimizer)
    assert flags and all(float(t) == 0.0 for t in flags.values())


@pytest.mark.parametrize("probe, what", [
    (lambda: _torch.scaler_found_inf_per_device(object(), object()), "GradScaler._per_optimizer_states"),
    (lambda: _torch.fsdp_param_groups(object()), "FSDPModule._get_fsdp_state"),
    (lambda: _torch.fsdp_reduce_scatter_comm(object()), "FSDPParamGroup._reduce_scatter_comm"),
    (lambda: _torch.fsdp_all_reduce_hook(object()), "FSDPParamGroup._all_reduce_hook"),
    (lambda: _torch.fsdp_reduce_scatter_group(object()), "FSDPParamGroup._reduce_scatter_process_group"),
])
def test_a_missing_internal_is_named_with_the_torch_version(probe, what):
    with pytest.raises(_torch.TorchInternalsError) as raised:
        probe()
    assert str(raised.value).startswith(f"adasum: {what} is missing in torch {torch.__version__}")
