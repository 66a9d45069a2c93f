"""Bootstrap confidence intervals over seeds: of one combiner's median, and of the difference
between two combiners paired by seed (a seed fixes the initialisation and the data order, so
two combiners' runs with the same seed share their luck, and the pairs' differences vary less
than the runs do)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_difference_ci", "median_ci", "DRAWS", "LEVEL"]

DRAWS = 4000
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], *,
                 draws: int = DRAWS, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic`` of ``values`` and its percentile bootstrap
    interval at ``level``. ``statistic`` reduces the last axis of an array (it is applied to all
    ``draws`` resamples at once). The same ``seed`` gives the same interval."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resampled = data[rng.integers(0, data.size, size=(draws, data.size))]
    low, high = np.quantile(statistic(resampled), [(1 - level) / 2, (1 + level) / 2])
    return float(statistic(data[None])[0]), float(low), float(high)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], **options) -> tuple[float, float, float]:
    """The mean of ``a[i] - b[i]`` over the pairs, with its bootstrap interval (the pairs are
    resampled, so each keeps its two runs together)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    return bootstrap_ci(np.subtract(a, b), lambda x: x.mean(axis=-1), **options)


def median_ci(values: Sequence[float], **options) -> tuple[float, float, float]:
    """The median of ``values`` with its bootstrap interval."""
    return bootstrap_ci(values, lambda x: np.median(x, axis=-1), **options)
