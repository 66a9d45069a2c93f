"""Horovod names with no counterpart here: calling one raises NotImplementedError saying what
to use instead (docs/horovod.md lists them)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["not_offered"]


def not_offered(module: str, name: str, instead: str) -> Callable[..., None]:
    """A stand-in for ``module.name`` that refuses every call, naming ``instead``."""

    def missing(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"{module}.{name} is not offered; {instead}")

    missing.__name__ = name
    missing.__doc__ = f"Not offered: {instead}."
    return missing
