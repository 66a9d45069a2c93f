"""Helpers the test modules share.

Multi-process tests start real Gloo groups through :func:`adasum.launch.spawn`, whose
``timeout`` ends every worker, so a bug fails the test instead of hanging it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

#: Seconds a spawned group may take before its workers are ended and the test fails.
TIMEOUT = 120


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: equal bits, not just equal values (NaN, -0.0)."""
    return t.contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor]) -> bool:
    """Whether two tensors, or two lists of tensors, have the same dtypes, shapes and bits."""
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y)) for x, y in zip(a, b)
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``x`` against ``ref`` (the norm of ``x`` when ``ref`` is zero)."""
    x, ref = x.double().flatten(), ref.double().flatten()
    return float((x - ref).norm() / ref.norm()) if ref.norm() > 0 else float(x.norm())


def messages(fn: Callable[[], object]) -> Counter:
    """The Gloo operations ``fn()`` runs on this rank, by name (``gloo:send``, ``gloo:recv``,
    ``gloo:all_gather``, ...), as torch's profiler records them: counted outside the library,
    whichever of its code paths sends them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return Counter(e.name for e in profile.events() if e.name.startswith("gloo:"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests of modules that start worker processes are marked slow: pytest -m "not slow" runs
    # the single-process ones, a loop of seconds.
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and any(hasattr(module, name) for name in ("spawn", "subprocess")):
            item.add_marker(pytest.mark.slow)


def caught(fn) -> str | None:
    """``"TypeName: message"`` of the TypeError or ValueError ``fn()`` raises, else None."""
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def raised(fn) -> str | None:
    """The first line of ``"TypeName: message"`` of any exception ``fn()`` raises, else None
    (for a multi-process test, where a rank that raised alone is the failure to look for)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None
