"""Python objects, parameters and optimizer state from one rank to all."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from adasum._groups import message_device
from adasum.horovod._agree import agree
from adasum.horovod._collectives import broadcast_many_async_, root_of
from adasum.horovod._runtime import group_of

__all__ = ["broadcast_object", "allgather_object", "broadcast_parameters", "broadcast_optimizer_state"]


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: dist.ProcessGroup | None = None) -> Any:
    """``obj`` as ``root_rank`` passed it, on every rank (pickled; other ranks' ``obj`` is
    ignored). A ``name``, if given, must be the same on every rank."""
    group = group_of(process_set)
    root, problem = root_of(root_rank, group)
    agree(group, "broadcast_object", [], (("name", name), ("root_rank", root_rank)), problem)
    box = [obj]
    dist.broadcast_object_list(box, src=root, group=group)
    return box[0]


def allgather_object(obj: Any, name: str | None = None, process_set: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled). A ``name``, if given, must be the same
    on every rank."""
    group = group_of(process_set)
    agree(group, "allgather_object", [], (("name", name),), None)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def _named_tensors(params: Mapping[Any, torch.Tensor] | torch.nn.Module | Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from a state dict, ``named_parameters()``, or tensors; a mapping is
    taken in sorted key order so that every rank lists the same tensors in the same order."""
    if isinstance(params, Mapping):
        return sorted(((str(k), v) for k, v in params.items()), key=lambda kv: kv[0])
    if isinstance(params, torch.nn.Module):
        return sorted(params.state_dict().items())
    pairs: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(params):
        pairs.append((str(item[0]), item[1]) if isinstance(item, tuple) else (str(i), item))
    return pairs


def broadcast_parameters(params: Mapping[str, torch.Tensor] | Iterable, root_rank: int = 0,
                         process_set: dist.ProcessGroup | None = None) -> None:
    """Overwrite the tensors in ``params`` on every rank with their values on ``root_rank``:
    ``model.state_dict()`` (parameters and buffers), ``model.named_parameters()``,
    ``model.parameters()``, or a module. One agreement on all names and shapes first."""
    pairs = _named_tensors(params)
    names = [n for n, _ in pairs]
    broadcast_many_async_([t for _, t in pairs], root_rank, process_set, "broadcast_parameters", names=names).wait()


class _Placeholder(NamedTuple):
    """Where a tensor of the root's optimizer state goes, in the broadcast skeleton."""

    slot: int  # not `index`, which would hide tuple.index
    shape: tuple[int, ...]
    dtype: torch.dtype


def _hollow(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with its tensors replaced by placeholders (collected in ``tensors``)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Placeholder(len(tensors) - 1, tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {k: _hollow(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_hollow(v, tensors) for v in value)
    return value


def _filled(value: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`_hollow`."""
    if isinstance(value, _Placeholder):
        return tensors[value.slot]
    if isinstance(value, dict):
        return {k: _filled(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_filled(v, tensors) for v in value)
    return value


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, model: object = None,
                              process_set: dist.ProcessGroup | None = None) -> None:
    """Make every rank's optimizer state and hyperparameters (learning rates, momentum
    buffers, Adam moments, step counts) those of ``root_rank``: its ``state_dict()``, loaded
    everywhere. An optimizer that has not stepped yet is sent as it is (no dummy step, which
    could move the parameters). Works for any optimizer with ``state_dict``/``load_state_dict``,
    L-BFGS included; ``model`` is accepted for Horovod's scripts and not needed. If a rank
    cannot load the state (a different model), every rank raises ``MismatchError``.
    """
    group = group_of(process_set)
    root, problem = root_of(root_rank, group)
    agree(group, "broadcast_optimizer_state", [], (("root_rank", root_rank),), problem)
    on_root = dist.get_rank(group) == root_rank
    mine: list[torch.Tensor] = []
    skeleton = _hollow(optimizer.state_dict(), mine) if on_root else None
    specs = [(tuple(t.shape), t.dtype) for t in mine]
    skeleton, specs = broadcast_object((skeleton, specs), root_rank, process_set=process_set)
    # Everything travels on the group's message device (the CPU for Gloo); load_state_dict
    # moves each tensor next to its parameter.
    device = message_device(group)
    tensors = [t.to(device) for t in mine] if on_root else [torch.empty(s, dtype=d, device=device) for s, d in specs]
    for work in [dist.broadcast(t, src=root, group=group, async_op=True) for t in tensors]:
        work.wait()
    failure = None
    if not on_root:
        try:
            optimizer.load_state_dict(_filled(skeleton, tensors))
        except (ValueError, KeyError, RuntimeError) as e:
            failure = f"cannot load the optimizer state of rank {root_rank}: {e}"
    agree(group, "broadcast_optimizer_state", [], (("loaded", True),), failure)
