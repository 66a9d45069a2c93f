"""``adasum simulate --geometry``: what Adasum makes of N vectors at a known pairwise angle.

Adasum of orthogonal vectors is their sum and of equal vectors their average; in between, the
length of the result says which it is closer to. Nothing is trained: the vectors are drawn
with exactly the asked cosine and reduced in one process (:meth:`adasum.Adasum.reduce`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import adasum

__all__ = ["geometry"]


def geometry(workers: Sequence[int], cosines: Sequence[float], dim: int = 4096,
             seed: int = 0) -> list[dict]:
    """Adasum of N unit vectors whose pairwise cosine is ``c``: its length relative to the sum
    and to the average. Orthogonal vectors (c = 0) should give the sum, equal ones the average.

    The vectors are ``sqrt(c) u + sqrt(1 - c) e_i`` with u a shared unit vector and e_i
    orthonormal noise directions, so every pair has cosine exactly c.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in workers:
        basis, _ = torch.linalg.qr(torch.randn(dim, n + 1, generator=g, dtype=torch.float64))
        shared, noise = basis[:, 0], basis[:, 1:].T
        for c in cosines:
            vectors = math.sqrt(c) * shared + math.sqrt(1 - c) * noise
            a = adasum.Adasum().reduce(list(vectors))
            total, mean = vectors.sum(0), vectors.mean(0)
            rows.append({
                "workers": n, "cosine": c,
                "dist_to_sum": ((a - total).norm() / total.norm()).item(),
                "dist_to_average": ((a - mean).norm() / mean.norm()).item(),
                "norm_over_average": (a.norm() / mean.norm()).item(),
            })
    return rows
