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

Every rank checks with the others before anything is installed (:func:`use_adasum`) and
before every reduction (a parameter frozen after ``use_adasum`` on some ranks): on a difference
every rank raises the same error. Not supported (a clear error): several parameter groups per
module (a ``shard_placement_fn`` with per-parameter meshes), modules on different meshes, calling
it twice. Parameter boundaries come from FSDP's parameter groups, which torch keeps private:
this module reads them through ``FSDPModule._get_fsdp_state()``, and under HSDP it gives the
group a 1-D (shard) mesh description so that FSDP hands the reduction across replicas to the
hook instead of running its own all-reduce (tested with torch 2.13).

Timeouts: the reduction across replicas runs over groups that wait no longer than the default
group (``init_process_group(timeout=...)``); ``init_device_mesh`` gives the mesh's groups
torch's 30-minute default instead, so FSDP's own all-gather and reduce-scatter may wait that
long, and :func:`use_adasum` warns (docs/failures.md says how to build a mesh with a timeout).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from adasum import _sharded, _vhdd
from adasum._buffers import Buffers
from adasum._check import Problem, Setting, _hash, agree
from adasum._groups import bounded, message_device, new_group_like, timeout_of
from adasum._layout import DtypeGroup, Flats, Layout
from adasum._ops import SUPPORTED_DTYPES, offsets_of
from adasum._p2p import Link
from adasum._plan import plan_of
from adasum._torch import (
    fsdp_all_reduce_hook,
    fsdp_api,
    fsdp_param_groups,
    fsdp_reduce_scatter_comm,
    fsdp_reduce_scatter_group,
)

if TYPE_CHECKING:  # the installed torch's classes, for the checker; at run time fsdp_api finds them
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
else:
    _FSDP = fsdp_api()
    ReduceScatter, DefaultReduceScatter = _FSDP.ReduceScatter, _FSDP.DefaultReduceScatter
    FSDPMeshInfo, HSDPMeshInfo, FSDPParamGroup = _FSDP.FSDPMeshInfo, _FSDP.HSDPMeshInfo, _FSDP.FSDPParamGroup

__all__ = ["use_adasum", "AdasumReduceScatter", "AdasumAcrossReplicas"]

_INSTALL: Setting = (("call", "adasum.fsdp.use_adasum"),)
_REDUCTION: Setting = (("call", "adasum.fsdp reduction"),)


def _agree_on_input(group: dist.ProcessGroup | None, tensor: torch.Tensor, numels: tuple[int, ...],
                    rows: int) -> None:
    """Return on every rank of ``group`` when each holds ``rows`` rows of the parameter group's
    segments in one dtype; otherwise raise the same error on every rank (an exchange of buffers
    of different sizes aborts the process inside Gloo). Every call agrees, unlike the DDP hook
    that agrees once per layout: FSDP reads ``requires_grad`` again at every forward pass, so
    a parameter frozen on one rank changes what it hands over there at any step."""
    expected = sum(numels) * rows
    problem = None if tensor.numel() == expected else Problem(
        ValueError, f"adasum.fsdp: the reduce-scatter input holds {tensor.numel()} elements, the parameter "
                    f"group's gradients {expected}: a parameter was frozen or unfrozen after use_adasum")
    layout = None if problem else Layout.of_flat(numels, tensor.dtype)
    agree(group, problem, layout, _REDUCTION, message_device(group))


class AdasumReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter, replaced by Adasum's halving phase for one parameter group.

    ``numels`` are the parameters' segment sizes in one rank's row of FSDP's reduce-scatter
    input (each parameter's padded shard), in the group's order.
    """

    def __init__(self, numels: Sequence[int]) -> None:
        self.numels = tuple(int(n) for n in numels)
        self.buffers = Buffers()  # kept between calls; buffers.clear() frees them

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
        _agree_on_input(group, input_tensor, self.numels, dist.get_world_size(group))
        with torch.no_grad():
            _sharded.reduce_scatter(output_tensor, input_tensor, self.numels, group, self.buffers)


class _AgreedReduceScatter(ReduceScatter):
    """HSDP: FSDP's own reduce-scatter (the average inside the shard group), after every rank of
    the mesh (``members``, None: the default group) agreed on its input, so that a parameter
    frozen on part of a shard group fails on every rank instead of aborting one inside Gloo.
    The reduction across replicas that follows works on its output and needs no check of its
    own."""

    def __init__(self, numels: Sequence[int], members: dist.ProcessGroup | None) -> None:
        self.numels = tuple(int(n) for n in numels)
        self.members = members
        self.inner = DefaultReduceScatter()

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: object = None,
        async_op: bool = False,
    ) -> dist.Work | None:
        _agree_on_input(self.members, input_tensor, self.numels, dist.get_world_size(group))
        return self.inner(output_tensor, input_tensor, group, op, async_op)


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


@dataclass(frozen=True)
class _Parameters(Layout):
    """A model's FSDP parameters as the ranks agree on them: besides the (global) shape and
    dtype, the name, and whether the parameter is frozen (it then has no gradient to reduce)."""

    names: tuple[str, ...]
    frozen: tuple[bool, ...]

    @cached_property
    def signature(self) -> int:
        return _hash(tuple(self.describe(i) for i in range(len(self))))

    def describe(self, i: int) -> str:
        return f"{self.names[i]} {super().describe(i)}" + (" frozen" if self.frozen[i] else "")


def _problem(modules: Sequence[FSDPModule], groups: list[tuple[str, FSDPParamGroup]]) -> Problem | None:
    """What this rank sees wrong with its model alone."""
    if not modules:
        return Problem(ValueError, "adasum.fsdp.use_adasum needs a model with fully_shard applied to it")
    if any(len(fsdp_param_groups(m)) > 1 for m in modules):
        return Problem(ValueError, "adasum.fsdp: a module with several FSDP parameter groups (per-parameter meshes) "
                                   "is not supported")
    for _, group in groups:
        if isinstance(fsdp_reduce_scatter_comm(group), AdasumReduceScatter) or isinstance(
            fsdp_all_reduce_hook(group), AdasumAcrossReplicas
        ):
            return Problem(ValueError, "adasum.fsdp.use_adasum was already called on this model")
        reduce_dtype = group.mp_policy.reduce_dtype
        if reduce_dtype is not None and reduce_dtype not in SUPPORTED_DTYPES:
            return Problem(ValueError, f"adasum.fsdp: reduce_dtype {reduce_dtype} is not supported (float16, "
                                       "bfloat16, float32, float64)")
        if group.mesh_info.mesh != groups[0][1].mesh_info.mesh:
            return Problem(ValueError, "adasum.fsdp: the model's FSDP modules are on different device meshes")
    return None


def _description(model: torch.nn.Module, groups: list[tuple[str, FSDPParamGroup]]) -> tuple[_Parameters, Setting]:
    """Every FSDP parameter in reduction order, and how they fall into parameter groups."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    params = [p.sharded_param for _, group in groups for p in group.fsdp_params]
    layout = _Parameters(
        tuple(tuple(p.shape) for p in params), tuple(p.dtype for p in params),
        tuple(names.get(id(p), "?") for p in params), tuple(not p.requires_grad for p in params),
    )
    setting = _INSTALL + (
        ("param_groups", tuple((name, len(group.fsdp_params)) for name, group in groups)),
        ("meshes", tuple((type(group.mesh_info).__name__, tuple(group.mesh_info.mesh.shape)) for _, group in groups)),
        ("reduce_dtypes", tuple(str(group.mp_policy.reduce_dtype) for _, group in groups)),
    )
    return layout, setting


def _members(group: FSDPParamGroup | None) -> dist.ProcessGroup | None:
    """Every rank that shares the parameter group's gradients: FSDP's reduce-scatter group, or
    under HSDP the whole mesh (the default group where the mesh spans the world)."""
    if group is None:  # no FSDP parameters at all
        return None
    mesh = group.mesh_info
    if not isinstance(mesh, HSDPMeshInfo):
        return fsdp_reduce_scatter_group(group)
    ranks = sorted(mesh.mesh.mesh.flatten().tolist())
    return None if ranks == list(range(dist.get_world_size())) else new_group_like(None, ranks, local=True)


def _agree_to_install(members: dist.ProcessGroup | None, problem: Problem | None,
                      description: tuple[_Parameters, Setting] | None) -> None:
    layout, setting = description if description is not None else (None, _INSTALL)
    try:
        agree(members, problem, layout, setting, message_device(members))
    except RuntimeError as e:  # a refusal is a ValueError; this is a peer that never came, or died
        raise RuntimeError(
            "adasum.fsdp.use_adasum: not every rank of the mesh took part in the agreement on the model within the "
            f"process group's timeout (every rank must call use_adasum on the same model): {str(e).splitlines()[0]}"
        ) from e


def _warn_if_waits_longer(mesh: FSDPMeshInfo) -> None:
    """Warn where FSDP's own collectives wait longer than the default group would."""
    groups = [mesh.shard_process_group] + ([mesh.replicate_process_group] if isinstance(mesh, HSDPMeshInfo) else [])
    default = timeout_of(None)
    longest = max((t for t in map(timeout_of, groups) if t is not None), default=None)
    if default is not None and longest is not None and longest > default:
        warnings.warn(
            f"adasum.fsdp: the device mesh's process groups wait up to {longest} for a peer, the default group "
            f"{default}: the collectives over them (FSDP's all-gather, the reduce-scatter) wait that long when a "
            "rank fails; the reduction across HSDP replicas waits no longer than the default group. Build the mesh "
            "from groups made with your timeout: see 'FSDP2 and HSDP' in docs/failures.md",
            stacklevel=3,
        )


def _install(module: FSDPModule, group: FSDPParamGroup, members: dist.ProcessGroup | None,
             hsdp: tuple[dist.ProcessGroup, dist.ProcessGroup] | None) -> AdasumReduceScatter | AdasumAcrossReplicas:
    # Every parameter that can have a gradient takes part in every reduction (a zero gradient if
    # unused), so the segments are the same on every rank and every step.
    numels = [p.padded_sharded_param_size.numel() for p in group.fsdp_params if p.sharded_param.requires_grad]
    if hsdp is None:
        comm = AdasumReduceScatter(numels)
        module.set_custom_reduce_scatter(comm)
        module.set_gradient_divide_factor(1.0)
        return comm
    hook = AdasumAcrossReplicas(numels, *hsdp)
    mesh = group.mesh_info
    # Described as 1-D, the group reduce-scatters (averaging) over the shard group and hands the
    # result to the hook instead of all-reducing across replicas.
    group.mesh_info = FSDPMeshInfo(
        mesh.mesh, shard_mesh_dim=mesh.shard_mesh_dim, dp_mesh_dims=mesh.dp_mesh_dims, spmd_mesh=mesh.spmd_mesh,
    )
    module.set_custom_reduce_scatter(_AgreedReduceScatter(numels, members))
    module.set_all_reduce_hook(hook)
    return hook


def use_adasum(model: torch.nn.Module) -> list[AdasumReduceScatter | AdasumAcrossReplicas]:
    """Make every FSDP module in ``model`` reduce its gradients with Adasum (module docstring).

    Call it once, on every rank, after ``fully_shard`` has been applied to the submodules and
    the root, before the first forward pass. Returns what it installed (one object per
    parameter group). The ranks first agree on the model: every FSDP parameter's name, shape,
    dtype and whether it is frozen, the parameter groups, meshes and reduce dtypes. On any
    difference, or a model without FSDP modules or one already set up on some rank, every rank
    raises the same ValueError and nothing is installed; a rank that does not call it makes the
    others raise RuntimeError within the process group's timeout. Warns when the mesh's groups
    wait longer than the default group.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [(name, g) for name, m in model.named_modules() if isinstance(m, FSDPModule) for g in fsdp_param_groups(m)]
    problem = _problem(modules, groups)
    members = _members(groups[0][1] if groups else None)
    _agree_to_install(members, problem, None if problem else _description(model, groups))
    if not groups:
        return []
    mesh = groups[0][1].mesh_info
    _warn_if_waits_longer(mesh)
    hsdp = None
    if isinstance(mesh, HSDPMeshInfo):  # the reduction's own groups, each member in the same order
        hsdp = bounded(mesh.replicate_process_group), bounded(mesh.shard_process_group)
    installed = []
    for module in modules:
        installed += [_install(module, group, members, hsdp) for group in fsdp_param_groups(module)]
        module.set_reduce_scatter_unused_params(True, recurse=False)
    return installed
