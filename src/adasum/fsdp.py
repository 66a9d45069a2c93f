"""Adasum under FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded gradient mode.

::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    adasum.fsdp.use_adasum(model)

From then on every FSDP parameter group's gradient reduction is Adasum: after backward, each
rank's shard of each parameter's gradient is that rank's shard of

.. math::  \\mathrm{Adasum}(g_0, \\ldots, g_{N-1})

over all ranks' local, unreduced, full gradients g_r of that parameter (each parameter is one
layer: its dot products span all its shards), in the order of :func:`adasum.schedule`, any
world size. It replaces FSDP's reduce-scatter (:meth:`FSDPModule.set_custom_reduce_scatter`)
by the halving phase of Adasum's algorithm alone (:mod:`adasum._sharded`), so it moves the
bytes of a reduce-scatter plus a few small messages for the dot products.

**HSDP** (a 2-D mesh, replicate x shard, e.g. ``init_device_mesh("cuda", (nodes, 8),
mesh_dim_names=("replicate", "shard"))``): inside the shard group FSDP averages as usual; across
replicas the shards of those averages are reduced with Adasum per parameter, each parameter's
dot products summed over the shard group, so that every replica's vector is the whole
parameter (:class:`AdasumAcrossReplicas`, FSDP's all-reduce hook, in place of its replicate
all-reduce).

The result is NOT divided by the world size (FSDP's averaging is switched off, as with the DDP
hook; under HSDP only the average inside the shard group remains): start from the learning rate
tuned for one rank's batch (HSDP: one shard group's batch). Gradient accumulation with
``set_requires_gradient_sync(False)`` works (the accumulated gradients are reduced on the
synchronising backward). A mixed-precision policy's ``reduce_dtype`` may be float16, bfloat16,
float32 or float64 (dot products are accumulated in float64 whatever it is).

Not supported (a clear error): several parameter groups per module (a ``shard_placement_fn``
with per-parameter meshes), calling it twice. Parameter boundaries come from FSDP's parameter
groups, which torch keeps private: this module reads them through
``FSDPModule._get_fsdp_state()``, and under HSDP it gives the group a 1-D (shard) mesh
description so that FSDP hands the reduction across replicas to the hook instead of running its
own all-reduce (tested with torch 2.13).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo

from adasum import _sharded, _vhdd
from adasum._buffers import Buffers
from adasum._layout import DtypeGroup, Flats
from adasum._ops import SUPPORTED_DTYPES, offsets_of
from adasum._p2p import Link
from adasum._plan import plan_of

__all__ = ["use_adasum", "AdasumReduceScatter", "AdasumAcrossReplicas"]


class AdasumReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter, replaced by Adasum's halving phase for one parameter group.

    ``numels`` are the parameters' segment sizes in one rank's row of FSDP's reduce-scatter
    input (each parameter's padded shard), in the group's order.
    """

    def __init__(self, numels: Sequence[int]) -> None:
        self.numels = tuple(int(n) for n in numels)
        self.buffers = Buffers()  # kept between calls; buffers.clear() frees them

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: object = None,
        async_op: bool = False,
    ) -> None:
        # ``op`` is FSDP's choice of sum or average: Adasum is neither, and the division is off.
        expected = sum(self.numels) * dist.get_world_size(group)
        if input_tensor.numel() != expected:
            raise RuntimeError(
                f"adasum.fsdp: the reduce-scatter input holds {input_tensor.numel()} elements, "
                f"the parameter group's gradients {expected}: a parameter was added or frozen "
                "after use_adasum"
            )
        with torch.no_grad():
            _sharded.reduce_scatter(output_tensor, input_tensor, self.numels, group, self.buffers.get)


class AdasumAcrossReplicas:
    """HSDP's all-reduce hook: this rank's shard of its shard group's average becomes its shard
    of the Adasum over the replicas, per parameter, with the dot products summed over the shard
    group (VHDD over the replicate group, :mod:`adasum._vhdd`)."""

    def __init__(self, numels: Sequence[int], replicate: dist.ProcessGroup, shards: dist.ProcessGroup) -> None:
        self.numels = tuple(int(n) for n in numels)
        self.replicate, self.shards = replicate, shards
        self.buffers = Buffers()  # kept between calls; buffers.clear() frees them

    def __call__(self, output: torch.Tensor) -> None:
        replicas = dist.get_world_size(self.replicate)
        if replicas == 1:
            return
        layers = DtypeGroup(output.dtype, tuple(range(len(self.numels))), offsets_of(list(self.numels)))
        flats = Flats([output], [layers], len(self.numels), shards=self.shards)
        plan = plan_of(replicas, dist.get_rank(self.replicate))
        with torch.no_grad():
            _vhdd.run(flats, plan, Link(self.replicate), lambda like, n: self.buffers.get("recv", like, n), None)


def _param_groups(module: FSDPModule) -> list:
    return list(module._get_fsdp_state()._fsdp_param_groups)


def _check(module: FSDPModule) -> None:
    groups = _param_groups(module)
    if len(groups) > 1:
        raise ValueError("adasum.fsdp: a module with several FSDP parameter groups (per-parameter meshes) is not supported")
    for group in groups:
        if isinstance(group._reduce_scatter_comm, AdasumReduceScatter) or isinstance(
            group._all_reduce_hook, AdasumAcrossReplicas
        ):
            raise ValueError("adasum.fsdp: use_adasum was already called on this model")
        reduce_dtype = group.mp_policy.reduce_dtype
        if reduce_dtype is not None and reduce_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"adasum.fsdp: reduce_dtype {reduce_dtype} is not supported (float16, bfloat16, float32, float64)")


def use_adasum(model: torch.nn.Module) -> list[AdasumReduceScatter | AdasumAcrossReplicas]:
    """Make every FSDP module in ``model`` reduce its gradients with Adasum (module docstring).

    Call it once, on every rank, after ``fully_shard`` has been applied to the submodules and
    the root. Returns what it installed (one object per parameter group). Raises ValueError for
    a model without FSDP modules or one already set up; every rank runs the same code on the
    same model, so every rank raises alike.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError("adasum.fsdp.use_adasum needs a model with fully_shard applied to it")
    for module in modules:
        _check(module)
    installed = []
    for module in modules:
        for group in _param_groups(module):
            # Every parameter that can have a gradient takes part in every reduction (a zero
            # gradient if unused), so the segments are the same on every rank and every step.
            numels = [p.padded_sharded_param_size.numel() for p in group.fsdp_params if p.sharded_param.requires_grad]
            mesh = group.mesh_info
            if isinstance(mesh, HSDPMeshInfo):
                hook = AdasumAcrossReplicas(numels, mesh.replicate_process_group, mesh.shard_process_group)
                # Described as 1-D, the group reduce-scatters (averaging) over the shard group
                # and hands the result to the hook instead of all-reducing across replicas.
                group.mesh_info = FSDPMeshInfo(
                    mesh.mesh, shard_mesh_dim=mesh.shard_mesh_dim, dp_mesh_dims=mesh.dp_mesh_dims,
                    spmd_mesh=mesh.spmd_mesh,
                )
                module.set_all_reduce_hook(hook)
                installed.append(hook)
            else:
                comm = AdasumReduceScatter(numels)
                module.set_custom_reduce_scatter(comm)
                module.set_gradient_divide_factor(1.0)
                installed.append(comm)
        module.set_reduce_scatter_unused_params(True, recurse=False)
    return installed
