"""The single-process reducer against an independent implementation."""

import math

import numpy as np
import pytest
import torch

import adasum

DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 100 * 2**-10, torch.bfloat16: 100 * 2**-7}


def np_adasum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    guard = math.sqrt(np.finfo(np.float64).tiny)
    dot, aa, bb = a @ b, a @ a, b @ b
    ca = 1.0 if aa < guard else 1 - dot / (2 * aa)
    cb = 1.0 if bb < guard else 1 - dot / (2 * bb)
    return ca * a + cb * b


def np_tree(vectors: list[np.ndarray], dtype: torch.dtype) -> np.ndarray:
    """Rule 4 by recursion: fold the first 2r ranks pairwise, then split the leaves in halves.
    Every intermediate result is rounded to the layer's dtype, as the contract says."""

    def combine(a, b):
        return torch.from_numpy(np_adasum(a, b)).to(dtype).double().numpy()

    n = len(vectors)
    p = 1 << (n.bit_length() - 1)
    r = n - p
    leaves = [combine(vectors[2 * i], vectors[2 * i + 1]) for i in range(r)] + vectors[2 * r :]

    def tree(xs):
        if len(xs) == 1:
            return xs[0]
        h = len(xs) // 2
        return combine(tree(xs[:h]), tree(xs[h:]))

    return tree(leaves)


SHAPES = [((4, 3), torch.float32), ((0,), torch.float32), ((11,), torch.float64), ((2, 2, 2), torch.bfloat16),
          ((9,), torch.float16), ((1,), torch.float32)]


def make_inputs(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(d) for s, d in SHAPES] for _ in range(n)]


@pytest.mark.parametrize("n", range(1, 10))
def test_matches_independent_implementation(n):
    inputs = make_inputs(n)
    out = adasum.reduce(inputs)
    for i, (shape, dtype) in enumerate(SHAPES):
        ref = np_tree([rank[i].double().flatten().numpy() for rank in inputs], dtype)
        assert out[i].shape == shape and out[i].dtype == dtype
        got = out[i].double().flatten().numpy()
        scale = max(np.linalg.norm(ref), 1e-300)
        assert np.linalg.norm(got - ref) / scale <= DTYPE_TOL[dtype], (n, i)


def test_single_tensor_per_rank_and_identity():
    x = [torch.randn(5) for _ in range(3)]
    ref = adasum.combine(adasum.combine(x[0], x[1]), x[2])
    assert torch.allclose(adasum.reduce(x), ref, rtol=1e-6)
    one = adasum.reduce([x[0]])
    assert torch.equal(one, x[0]) and one is not x[0]


def test_inputs_are_not_modified():
    inputs = make_inputs(4)
    before = [[t.clone() for t in rank] for rank in inputs]
    adasum.reduce(inputs)
    assert all(torch.equal(a, b) for ra, rb in zip(inputs, before) for a, b in zip(ra, rb))


def test_stats_hold_each_combination():
    inputs = [[torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [[0.0, 1.0], [2.0]], [[1.0, 1.0], [-1.0]]]
    inputs = [[torch.as_tensor(t, dtype=torch.float32) for t in rank] for rank in inputs]
    _, stats = adasum.reduce(inputs, stats=True)
    assert len(stats.stages) == 2  # fold (0,1), then (0,2)
    fold = stats.stages[0][0]  # [3, layers]: a.b, |a|^2, |b|^2
    assert fold[:, 0].tolist() == [0.0, 1.0, 1.0]
    assert fold[:, 1].tolist() == [4.0, 4.0, 4.0]
    cos = stats.cosines()
    assert cos[0][0, 0] == 0.0 and cos[0][0, 1] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        adasum.reduce([])
    with pytest.raises(ValueError, match="tensor 0 is"):
        adasum.reduce([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="tensors"):
        adasum.reduce([[torch.ones(3)], [torch.ones(3), torch.ones(1)]])
    with pytest.raises(TypeError):
        adasum.reduce([torch.ones(3, dtype=torch.int32)] * 2)
