"""The reducer interface: the one place every front door plugs in.

A :class:`Reducer` replaces every rank's tensors, in place, by one reduction of all ranks'
tensors over its process group, per layer (each tensor, or each run of a flat buffer, is one
layer). Every call first runs the one validation (:mod:`adasum._check`), then packs the layers
into one flat buffer per dtype and hands them to the implementation's :meth:`Reducer._reduce`.
A front door that validates before it changes anything calls :meth:`Reducer.check` and hands
the :class:`Agreement` it returns to the reduction, which then skips its own round: one path
through the validation for every front door.
The same reduction, computed in one process over N simulated ranks, is :meth:`Reducer.reduce`:
the reference the tests compare against and the engine of the simulator.

A reducer keeps the buffers it reuses between calls (a fresh allocation of tens of megabytes
costs page faults on every step); :meth:`Reducer.close` frees them. One reducer serves one
thread; :meth:`Reducer.with_group` makes another with the same settings on another group.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from adasum._buffers import Buffers
from adasum._check import Problem, Setting, agree, flat_problem, local_problem
from adasum._exit import destroy_groups_at_exit
from adasum._groups import device_type_of, message_device
from adasum._layout import DtypeGroup, Flats, Layout
from adasum._stats import Stats

__all__ = ["Reducer", "Agreement"]

Tensors = torch.Tensor | Sequence[torch.Tensor]


class Reducer(abc.ABC):
    """A reduction of every rank's tensors over a process group (None: the default group).

    Subclasses: :class:`adasum.Adasum`, :class:`adasum.Hierarchical`, :class:`adasum.Average`,
    :class:`adasum.Sum`. Constructing one does not touch torch.distributed; the first one in a
    process arranges for the process groups to be destroyed at exit (:mod:`adasum._exit`).
    """

    #: What the reducer computes, as the program and the error messages name it.
    name: ClassVar[str]

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self._buffers = Buffers()
        destroy_groups_at_exit()

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.setting()[1:])
        return f"{type(self).__name__}({options})"

    # -- what every rank calls --------------------------------------------------------------

    def all_reduce(
        self,
        tensors: Tensors,
        *,
        stats: bool = False,
        options: Mapping[str, object] | None = None,
        agreement: Agreement | None = None,
    ) -> Stats | None:
        """Replace each rank's tensors by the reduction of all ranks' tensors, in place.

        Every rank of the group calls this with the same number of tensors, shapes and dtypes
        (float16, bfloat16, float32, float64) in the same order, on one device the group
        carries; otherwise every rank raises the same TypeError or ValueError before any data
        moves. With ``stats=True`` returns the :class:`~adasum.Stats` of the pairwise
        combinations on every rank (statistics never change the result); otherwise None.

        ``options``: the caller's own settings that every rank must pass alike, compared in the
        same round (see :meth:`check`). ``agreement``: what :meth:`check` returned for these
        tensors earlier in the step; the reduction then skips its own agreement round.
        """
        tensor_list = _listed(tensors)
        if agreement is None:
            agreement = self.check(tensor_list, stats=stats, options=options)
        else:
            self._covered(agreement, Layout.of(tensor_list), tensor_list, stats)
        with torch.no_grad():  # in place on leaves that require grad, at every size
            return self._reduce_tensors(tensor_list, agreement.layout, stats)

    def all_reduce_flat(
        self,
        buffer: torch.Tensor,
        numels: Sequence[int],
        *,
        stats: bool = False,
        options: Mapping[str, object] | None = None,
        agreement: Agreement | None = None,
    ) -> Stats | None:
        """:meth:`all_reduce` on one contiguous 1-D buffer holding layers of ``numels``
        elements end to end (a DDP bucket, say), in place and without a packing copy;
        ``agreement`` comes from :meth:`check_flat`."""
        if agreement is None:
            agreement = self.check_flat(buffer, numels, stats=stats, options=options)
        else:
            self._covered(agreement, Layout.of_flat(tuple(int(n) for n in numels), buffer.dtype), [buffer], stats)
        with torch.no_grad():
            if self._idle(agreement.layout):
                return self._idle_stats(len(agreement.layout)) if stats else None
            layout = agreement.layout
            return self._reduce(Flats([buffer], layout.groups, len(layout)), stats)

    def check(
        self,
        tensors: Tensors,
        *,
        stats: bool = False,
        options: Mapping[str, object] | None = None,
        error: Exception | None = None,
    ) -> Agreement:
        """The validation of :meth:`all_reduce` alone: returns on every rank, or raises the same
        error on every rank, and moves no data.

        For a front door that must know before it changes anything (the delta-mode optimizer
        checks the parameters before its local step). ``options`` are its own settings that
        every rank must pass alike (``{"mode": "delta"}``, say): a rank that differs makes
        every rank raise a ValueError naming the option. ``error`` is a problem this rank found
        in the caller's own input: every rank raises it, naming this rank. The returned
        :class:`Agreement`, passed to :meth:`all_reduce` with the same tensors (or tensors of
        the same shapes and dtypes) and ``stats``, spares the reduction a second round.
        """
        tensor_list = _listed(tensors)
        problem = _problem_of(error) or local_problem(tensor_list, device_type_of(self.group))
        problem = problem or self._problem(tensor_list)
        return self._agreed(problem, None if problem else Layout.of(tensor_list), tensor_list, stats, options)

    def check_flat(
        self,
        buffer: torch.Tensor,
        numels: Sequence[int],
        *,
        stats: bool = False,
        options: Mapping[str, object] | None = None,
        error: Exception | None = None,
    ) -> Agreement:
        """:meth:`check` of a flat buffer of layers of ``numels`` elements, for
        :meth:`all_reduce_flat`."""
        numels = tuple(int(n) for n in numels)
        problem = _problem_of(error) or flat_problem(buffer, numels, device_type_of(self.group))
        problem = problem or self._problem([buffer])
        layout = None if problem else Layout.of_flat(numels, buffer.dtype)
        return self._agreed(problem, layout, [buffer], stats, options)

    def agreement(self, tensors: Tensors, *, stats: bool = False) -> Agreement:
        """The :class:`Agreement` :meth:`check` would return, made here without a message.

        Only for a front door whose own agreement round already compared, on every rank, what
        :meth:`check` compares (shapes, dtypes, device, this reducer's settings and ``stats``):
        :mod:`adasum.horovod` agrees on each operation its own way. A wrong promise pairs
        mismatched data across ranks, which is what :meth:`check` exists to prevent.
        """
        tensor_list = _listed(tensors)
        return Agreement(Layout.of(tensor_list), _device(tensor_list), self.setting(), bool(stats))

    @abc.abstractmethod
    def reduce(self, per_rank: Sequence[Sequence[torch.Tensor]], *, stats: bool = False) -> Any:
        """The same reduction in one process: ``per_rank[r]`` is rank r's list of tensors (or
        one tensor). Returns the result like :func:`adasum.reduce` (with ``stats=True``,
        ``(result, Stats)``); the inputs are not changed."""

    # -- lifecycle --------------------------------------------------------------------------

    def with_group(self, group: dist.ProcessGroup | None) -> Reducer:
        """A reducer with these settings on ``group`` (and buffers of its own)."""
        clone = copy.copy(self)  # through __getstate__: no group, no buffers
        clone.group = group
        return clone

    def close(self) -> None:
        """Free the buffers kept between calls (the reducer stays usable)."""
        self._buffers.clear()

    def __enter__(self) -> Reducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # A process group does not survive a process boundary; an unpickled reducer works on
        # the default group.
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._buffers = Buffers()
        destroy_groups_at_exit()  # in the process it arrived in (a Ray worker's)

    # -- for subclasses ---------------------------------------------------------------------

    def setting(self) -> Setting:
        """What every rank must pass alike: the reducer and its options."""
        return (("reducer", self.name),)

    def _problem(self, tensors: Sequence[torch.Tensor]) -> Problem | None:
        """A problem only this kind of reducer has with valid tensors (none by default)."""
        return None

    @abc.abstractmethod
    def _reduce(self, flats: Flats, stats: bool) -> Stats | None:
        """Reduce the validated, non-empty buffers in place over a group of 2 or more ranks."""

    def _idle_stats(self, num_layers: int) -> Stats:
        """The statistics of a call with nothing to reduce (one rank, or no layers)."""
        return Stats(())

    # -- the shared steps -------------------------------------------------------------------

    def _agreed(
        self,
        problem: Problem | None,
        layout: Layout | None,
        tensors: list,
        stats: bool,
        options: Mapping[str, object] | None,
    ) -> Agreement:
        setting = self.setting() + (("stats", bool(stats)),) + tuple((options or {}).items())
        self._agree(problem, layout, setting)
        assert layout is not None  # a problem raised in the agreement
        return Agreement(layout, _device(tensors), self.setting(), bool(stats))

    def _agree(self, problem: Problem | None, layout: Layout | None, setting: Setting) -> None:
        # A method of its own so that a profiler can time the round.
        agree(self.group, problem, layout, setting, message_device(self.group))

    def _covered(self, agreement: Agreement, layout: Layout, tensors: list, stats: bool) -> None:
        """Raise on this rank if ``agreement`` was not made for tensors like these: a caller's
        mistake that every rank makes alike, since every rank runs the same code."""
        made = (agreement.layout.signature, agreement.device, agreement.setting, agreement.stats)
        given = (layout.signature, _device(tensors), self.setting(), bool(stats))
        if made != given:
            raise ValueError(
                f"adasum: the agreement passed to {type(self).__name__}.all_reduce was made by check() for "
                "other tensors, another device, another reducer or another stats flag; pass what check() was given"
            )

    def _reduce_tensors(self, tensor_list: list[torch.Tensor], layout: Layout, stats: bool) -> Stats | None:
        """The reduction of validated tensors whose layout every rank agreed on."""
        if self._idle(layout):
            return self._idle_stats(len(layout)) if stats else None
        in_place = [_end_to_end([tensor_list[i] for i in g.layers]) for g in layout.groups]
        buffers = [
            _flat_view(tensor_list[g.layers[0]], g.numel) if here else self._packed(layout, tensor_list, g)
            for g, here in zip(layout.groups, in_place)
        ]
        result = self._reduce(Flats(buffers, layout.groups, len(layout)), stats)
        for buffer, g, here in zip(buffers, layout.groups, in_place):
            if not here:
                layout.unpack(buffer, tensor_list, g)
        return result

    def _idle(self, layout: Layout) -> bool:
        return len(layout) == 0 or dist.get_world_size(self.group) == 1

    def _packed(self, layout: Layout, tensors: list[torch.Tensor], g: DtypeGroup) -> torch.Tensor:
        return layout.pack(tensors, g, out=self._buffers.get("pack", tensors[g.layers[0]], g.numel))


class Agreement:
    """What :meth:`Reducer.check` returns: every rank of the reducer's group passed this
    layout, on this device, to a reducer with this setting and this ``stats`` flag (and the
    caller's options alike). :meth:`Reducer.all_reduce` accepts it in place of its own
    agreement round; it holds no tensors and no process group."""

    __slots__ = ("layout", "device", "setting", "stats")

    def __init__(self, layout: Layout, device: torch.device | None, setting: Setting, stats: bool) -> None:
        self.layout, self.device, self.setting, self.stats = layout, device, setting, stats


def _listed(tensors: Tensors) -> list:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _device(tensors: list) -> torch.device | None:
    return tensors[0].device if tensors else None


def _problem_of(error: Exception | None) -> Problem | None:
    return None if error is None else Problem(type(error), str(error))


def _end_to_end(tensors: list[torch.Tensor]) -> bool:
    """Whether the tensors are contiguous and lie end to end, in order, in one storage (one
    tensor, or views of one flat buffer): then they are reduced where they lie, without the
    packing copy and its way back."""
    first = tensors[0]
    storage, at = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.data_ptr() != at:
            return False
        at += t.numel() * t.element_size()
    return True


def _flat_view(first: torch.Tensor, numel: int) -> torch.Tensor:
    """The 1-D view of ``numel`` elements starting where ``first`` starts."""
    return first.as_strided((numel,), (1,))
