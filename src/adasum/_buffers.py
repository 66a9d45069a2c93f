"""Buffers kept between calls: a fresh allocation of tens of megabytes costs page faults on
every training step, about as much as the arithmetic it holds."""

from __future__ import annotations

import torch

__all__ = ["Buffers"]


class Buffers:
    """One buffer per purpose, dtype and device, as large as the largest one asked for so far:
    memory bounded by the largest call; :meth:`clear` frees it all. Not shared across threads."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, purpose: str, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A 1-D buffer of ``numel`` elements of ``like``'s dtype and device, for ``purpose``."""
        key = (purpose, like.dtype, like.device)
        buf = self._kept.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._kept[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def clear(self) -> None:
        self._kept.clear()

    def numels(self) -> dict[str, int]:
        """``{"purpose dtype": elements}`` of what is kept."""
        return {f"{purpose} {dtype}": buf.numel() for (purpose, dtype, _), buf in self._kept.items()}
