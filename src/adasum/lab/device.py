"""Where a simulated run lives: its device by name, the chunk of workers whose activations fit
there, and the clock of its training steps (with the device's peak memory).

The simulator (:mod:`adasum.lab.simulate`) runs on the CPU or a CUDA device: the model, the data
and the reductions live there. Its memory is bounded by taking the per-worker gradients a chunk
of workers at a time; by default the chunk holds as many workers as fit in
:func:`chunk_budget` bytes of saved activations, measured on one worker's forward pass
(:func:`activation_bytes`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adasum.lab.config import ConfigError
from adasum.lab.task import Task

__all__ = ["resolve_device", "activation_bytes", "chunk_budget", "workers_per_chunk", "StepClock"]


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device this machine has, or ConfigError saying why not."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: the simulator runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name!r}: this machine has no CUDA device "
                              "(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
        # Numbered, as tensors report it, so that a task already there is not copied again.
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    return device


def activation_bytes(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes one worker's forward pass on ``(x, y)`` keeps for its backward pass: what each
    further worker of a chunk adds to the peak memory."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task.loss(model(x), y)
    return total


def chunk_budget(device: torch.device) -> int:
    """Saved activations one chunk of workers may hold: 256 MiB on the CPU, an eighth of the
    GPU's memory on CUDA. A fixed figure, not the free memory of the moment, so that the same
    command chunks the same way every time. On the CPU small chunks are also the fast ones:
    their memory is reused from step to step, where a large chunk's is returned to the system
    and faulted in again (64 workers of the small transformer on 2 cores: 2.2 s per step in
    chunks of 4, 3.9 s in one chunk)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 8
    return 256 << 20


def workers_per_chunk(asked: int | None, task: Task, model: torch.nn.Module, per_worker: int,
                 device: torch.device) -> int:
    """The workers per gradient call: ``asked``, or (None) as many workers of ``per_worker``
    examples as fit in :func:`chunk_budget`, at least one."""
    if asked is not None:
        if asked < 1:
            raise ConfigError(f"--worker-chunk must be at least 1, got {asked}")
        return asked
    x, y = task.examples(torch.arange(per_worker))
    return max(1, chunk_budget(device) // max(1, activation_bytes(task, model, x, y)))


class StepClock:
    """The wall time of each training step on ``device``, pauses left out, and the device's
    peak memory from the clock's creation on. On CUDA a step ends when the kernels it queued
    have run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._began = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start(self) -> None:
        self._began = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside is not part of the step."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self._began += time.perf_counter() - paused

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self._began)

    def seconds_per_step(self) -> float:
        """The mean step time, the first step left out when there are others: it pays the
        one-time costs (allocations, kernel selection, CUDA's start)."""
        timed = self.times[1:] or self.times
        return sum(timed) / len(timed)

    def peak(self) -> dict[str, float]:
        """``{"peak_gib": ...}``, the most memory allocated on a CUDA device; empty on the CPU."""
        if self.device.type != "cuda":
            return {}
        return {"peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}
