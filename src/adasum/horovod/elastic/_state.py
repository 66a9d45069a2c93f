"""``hvd.elastic.TorchState``: what a training function needs to continue after its world
changed, committed at points the script chooses.

Horovod kept the committed state in every worker's memory and reset the workers in place when a
host came or went. Under torchrun a lost or added agent ends every worker and the agents start
new ones, so memory does not survive: here ``commit()`` also writes the state to
``$ADASUM_ELASTIC_DIR/commit.pt`` (rank 0, atomically), and :func:`adasum.horovod.elastic.run`
reads it when the new workers start. Without the variable commits stay in memory, as in Horovod
(``restore()`` works, a restart starts from the beginning).

What each kind of attribute saves, restores and synchronises:

* a ``torch.nn.Module``: its ``state_dict()``; ``sync()`` broadcasts rank 0's.
* a ``torch.optim.Optimizer``: its ``state_dict()``; ``sync()`` broadcasts rank 0's. A delta-mode
  optimizer (``hvd.DistributedOptimizer(op=hvd.Adasum)``, :class:`adasum.optim.DistributedOptimizer`)
  keeps one state per rank (its own moments): a commit gathers all of them, and after a restart
  on M ranks rank r takes old rank ``r mod N``'s (:func:`adasum.optim.rank_state`); ``sync()``
  leaves them alone.
* an :class:`ElasticSampler`: its epoch and processed indices (every rank's record united).
* anything else: the object itself (deep-copied; written with pickle); ``sync()`` broadcasts
  rank 0's.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from adasum.horovod._objects import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from adasum.horovod._runtime import rank, size
from adasum.horovod.elastic._sampler import ElasticSampler
from adasum.optim._elastic import save_atomically

__all__ = ["TorchState", "DIR_VARIABLE", "commit_path"]

#: The environment variable naming the directory where commits are written.
DIR_VARIABLE = "ADASUM_ELASTIC_DIR"
_FORMAT = "adasum.horovod.elastic/1"


def commit_path() -> Path | None:
    """Where commits are written: ``$ADASUM_ELASTIC_DIR/commit.pt``, or None without the variable."""
    directory = os.environ.get(DIR_VARIABLE)
    return Path(directory) / "commit.pt" if directory else None


class _Handler:
    """How one attribute is saved in memory, restored, synchronised from rank 0, written in a
    commit and loaded from one. The constructor takes a local snapshot (no messages)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self._saved = copy.deepcopy(value.state_dict())

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        # A copy: an optimizer's load_state_dict keeps the tensors it is given, and its steps
        # would then change the snapshot.
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self) -> None:
        raise NotImplementedError

    def committed(self) -> Any:
        """What the commit file holds for this attribute (a collective where ranks differ)."""
        return self._saved

    def load(self, committed: Any) -> None:
        self.value.load_state_dict(committed)


class _ModelHandler(_Handler):
    def sync(self) -> None:
        broadcast_parameters(self.value.state_dict(), root_rank=0)


class _OptimizerHandler(_Handler):
    def __init__(self, value: torch.optim.Optimizer) -> None:
        super().__init__(value)
        # Delta mode: every rank's moments are its own (adasum.optim.DistributedOptimizer).
        self.per_rank = hasattr(value, "gather_state_dicts") and hasattr(value, "load_state_dicts")

    def sync(self) -> None:
        if not self.per_rank:
            broadcast_optimizer_state(self.value, root_rank=0)

    def committed(self) -> Any:
        return self.value.gather_state_dicts() if self.per_rank else self._saved

    def load(self, committed: Any) -> None:
        if self.per_rank:
            self.value.load_state_dicts(committed)
        else:
            self.value.load_state_dict(committed)


class _SamplerHandler(_Handler):
    value: ElasticSampler

    def save(self) -> None:
        self.value.unite()
        super().save()

    def sync(self) -> None:
        self.value.load_state_dict(broadcast_object(self.value.state_dict(), root_rank=0))


def _handler_for(value: Any) -> _Handler | None:
    if isinstance(value, torch.nn.Module):
        return _ModelHandler(value)
    if isinstance(value, torch.optim.Optimizer):
        return _OptimizerHandler(value)
    if isinstance(value, ElasticSampler):
        return _SamplerHandler(value)
    return None


class TorchState:
    """The state of a training function under :func:`adasum.horovod.elastic.run`.

    ``TorchState(model=None, optimizer=None, **kwargs)``: every argument becomes an attribute
    (``state.model``, ``state.epoch``, ...). Modules, optimizers and :class:`ElasticSampler`
    objects are saved through their ``state_dict()``; other values as they are. Every rank
    constructs the state with the same names and calls :meth:`commit` and :meth:`sync` at the
    same points (they exchange messages).
    """

    _handlers: dict[str, _Handler]
    _objects: list[str]  # the names of the plain attributes
    _saved_objects: dict[str, Any]
    _callbacks: list[Callable[[], Any]]
    _commits: int

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 **kwargs: Any) -> None:
        values = {"model": model, "optimizer": optimizer, **kwargs}
        handlers = {name: h for name, h in ((n, _handler_for(v)) for n, v in values.items()) if h is not None}
        objects = [name for name in values if name not in handlers]
        self.__dict__.update(values)
        self.__dict__.update(_handlers=handlers, _objects=objects, _saved_objects={}, _callbacks=[], _commits=0)
        self._save_objects()

    def __setattr__(self, name: str, value: Any) -> None:
        # A new model, optimizer or sampler for a tracked name: save and restore the new one.
        if name in self._handlers:
            handler = _handler_for(value)
            if handler is None:
                raise TypeError(f"TorchState.{name} holds a {type(self._handlers[name].value).__name__}; "
                                f"cannot replace it by a {type(value).__name__}")
            self._handlers[name] = handler
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only for names never set: says so, and tells type checkers that the attributes
        # given as keyword arguments (state.epoch, ...) exist.
        raise AttributeError(f"TorchState has no attribute {name!r}")

    def register_reset_callbacks(self, callbacks: Iterable[Callable[[], Any]]) -> None:
        """Functions to call after the workers restarted from a commit (a rank was lost or
        added), before the training function runs again: rescale the learning rate to the new
        ``hvd.size()``, for instance."""
        self._callbacks.extend(callbacks)

    def on_reset(self) -> None:
        """Run the reset callbacks (``run`` does, after loading a commit)."""
        for callback in self._callbacks:
            callback()

    def save(self) -> None:
        """Snapshot every attribute in memory (what :meth:`restore` returns to). A collective
        when the state holds an :class:`ElasticSampler` (the ranks' records are united)."""
        for handler in self._handlers.values():
            handler.save()
        self._save_objects()

    def _save_objects(self) -> None:
        self._saved_objects = copy.deepcopy({name: getattr(self, name) for name in self._objects})

    def restore(self) -> None:
        """Return every attribute to the last commit (or :meth:`sync`), in this process."""
        for handler in self._handlers.values():
            handler.restore()
        self.__dict__.update(copy.deepcopy(self._saved_objects))

    def sync(self) -> None:
        """Make every rank's state rank 0's (each rank keeps its own delta-mode optimizer
        state), and snapshot it."""
        for handler in self._handlers.values():
            handler.sync()
        self.__dict__.update(broadcast_object({name: getattr(self, name) for name in self._objects}, root_rank=0))
        self.save()

    def commit(self) -> None:
        """Snapshot the state in memory and, with ``$ADASUM_ELASTIC_DIR`` set, write it there
        (rank 0, atomically: a worker killed while writing leaves the previous commit whole),
        so that workers restarted by torchrun continue from it. Every rank calls it."""
        self.save()
        self._commits += 1
        path = commit_path()
        if path is not None:
            committed = {name: handler.committed() for name, handler in self._handlers.items()}
            if rank() == 0:
                save_atomically({"format": _FORMAT, "commit": self._commits, "world": size(),
                                 "objects": self._saved_objects, "handlers": committed}, path)
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Nothing to check: under torchrun the agents notice an agent joining or leaving and
        restart the workers themselves (Horovod's workers were told in place, and raised
        ``HostsUpdatedInterrupt`` here). Kept so that Horovod's scripts run unchanged."""

    def load_commit(self) -> bool:
        """Load the commit in ``$ADASUM_ELASTIC_DIR`` if there is one (every rank must see the
        same file); whether one was loaded. :func:`adasum.horovod.elastic.run` calls it."""
        path = commit_path()
        saved = torch.load(path, weights_only=False) if path is not None and path.exists() else None  # the job's own file
        seen = allgather_object(None if saved is None else saved["commit"], name="adasum.horovod.elastic.load")
        if len(set(seen)) > 1:
            raise RuntimeError(
                f"adasum.horovod.elastic: the ranks see different commits in {path} ({seen}, in rank "
                f"order; None: no file): ${DIR_VARIABLE} must be a directory every node sees"
            )
        if saved is None:
            return False
        if saved.get("format") != _FORMAT or sorted(saved["handlers"]) != sorted(self._handlers) or \
                sorted(saved["objects"]) != sorted(self._objects):
            raise RuntimeError(
                f"adasum.horovod.elastic: {path} holds {sorted(saved['handlers']) + sorted(saved['objects'])}, "
                f"this TorchState {sorted(self._handlers) + self._objects}: another job's commit? "
                f"(give each job its own ${DIR_VARIABLE})"
            )
        for name, handler in self._handlers.items():
            handler.load(saved["handlers"][name])
        self.__dict__.update(saved["objects"])
        self._commits = saved["commit"]
        self.save()
        return True

