"""Every place adasum reads a part of torch that torch does not promise to keep.

Each probe is one small function; when the internal it reads is missing (another torch
release moved or renamed it) it raises :class:`TorchInternalsError`, naming the internal and
the installed torch version, instead of an AttributeError from deep inside a step. The FSDP2
probes import FSDP's private modules on first use, so importing the core costs nothing.
``tests/test_torch_probes.py`` runs every probe on the installed torch, and on objects that
lack the internal.
"""

from __future__ import annotations

import functools
import importlib
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TorchInternalsError", "backend_timeout", "scaler_found_inf_per_device", "fsdp_api",
    "fsdp_param_groups", "fsdp_reduce_scatter_comm", "fsdp_all_reduce_hook", "fsdp_reduce_scatter_group",
]

#: The torch release these probes were written against.
TESTED = "2.13"


class TorchInternalsError(RuntimeError):
    """A torch internal adasum relies on is missing from the installed torch."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"adasum: {what} is missing in torch {torch.__version__} (adasum is tested with torch {TESTED}); "
            "install a tested torch release or report the version"
        )


def _read(obj: object, attribute: str, what: str) -> Any:
    try:
        return getattr(obj, attribute)
    except AttributeError:
        raise TorchInternalsError(what) from None


def backend_timeout(group: dist.ProcessGroup) -> timedelta:
    """The timeout the process group's backend was created with (torch keeps it private)."""
    device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    backend = _read(group, "_get_backend", "ProcessGroup._get_backend")(device)
    return _read(_read(backend, "options", "the backend's options"), "_timeout", "the backend's options._timeout")


def scaler_found_inf_per_device(scaler: torch.amp.GradScaler, optimizer: object) -> dict:
    """The per-device overflow flags ``scaler`` recorded for ``optimizer`` in this step, which
    ``scaler.update()`` reads (GradScaler has no public way to set them)."""
    states = _read(scaler, "_per_optimizer_states", "GradScaler._per_optimizer_states")
    try:
        return states[id(optimizer)]["found_inf_per_device"]
    except KeyError:
        raise TorchInternalsError("GradScaler's found_inf_per_device for this optimizer") from None


@functools.cache
def fsdp_api() -> SimpleNamespace:
    """FSDP2's private classes adasum.fsdp builds on: ``ReduceScatter`` (the custom
    reduce-scatter interface), ``DefaultReduceScatter``, ``FSDPMeshInfo``, ``HSDPMeshInfo`` and
    ``FSDPParamGroup``."""
    where = {
        "ReduceScatter": "_fsdp_api", "DefaultReduceScatter": "_fsdp_collectives",
        "FSDPMeshInfo": "_fsdp_common", "HSDPMeshInfo": "_fsdp_common", "FSDPParamGroup": "_fsdp_param_group",
    }
    found = {}
    for name, module in where.items():
        path = f"torch.distributed.fsdp._fully_shard.{module}"
        try:
            found[name] = getattr(importlib.import_module(path), name)
        except (ImportError, AttributeError):
            raise TorchInternalsError(f"{path}.{name}") from None
    return SimpleNamespace(**found)


def fsdp_param_groups(module: object) -> list:
    """The FSDP parameter groups of a module ``fully_shard`` was applied to (newer releases keep
    a list, older ones one group or None)."""
    state = _read(module, "_get_fsdp_state", "FSDPModule._get_fsdp_state")()
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    group = _read(state, "_fsdp_param_group", "FSDPState._fsdp_param_groups")
    return [] if group is None else [group]


def fsdp_reduce_scatter_comm(group: object) -> object:
    """The reduce-scatter a parameter group uses (``set_custom_reduce_scatter`` sets it)."""
    return _read(group, "_reduce_scatter_comm", "FSDPParamGroup._reduce_scatter_comm")


def fsdp_all_reduce_hook(group: object) -> object:
    """The all-reduce hook of a parameter group (HSDP's replica all-reduce)."""
    return _read(group, "_all_reduce_hook", "FSDPParamGroup._all_reduce_hook")


def fsdp_reduce_scatter_group(group: object) -> dist.ProcessGroup:
    """The process group a parameter group reduce-scatters over."""
    return _read(group, "_reduce_scatter_process_group", "FSDPParamGroup._reduce_scatter_process_group")
