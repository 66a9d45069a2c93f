"""The pairwise operator: its defining properties, dtypes, extreme magnitudes and bad input."""

import math

import pytest
import torch

import adasum
from adasum import _ops as ops

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Relative tolerance of the result against a float64 reference, per dtype: a few roundings.
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-6, torch.float64: 1e-14}


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The formula in float64, written out with no shared code."""
    a, b = a.double().flatten(), b.double().flatten()
    dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
    guard = math.sqrt(2.2250738585072014e-308)
    ca = 1.0 if aa < guard else 1 - dot / (2 * aa)
    cb = 1.0 if bb < guard else 1 - dot / (2 * bb)
    return ca * a + cb * b


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().flatten() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_vectors_are_summed(dtype):
    a = torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=dtype)
    b = torch.tensor([0.0, -2.0, 0.5, 0.0], dtype=dtype)
    assert torch.equal(adasum.combine(a, b), a + b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 3.0, 0.25])
def test_parallel_vectors_are_averaged(dtype, scale):
    a = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = (a.double() * scale).to(dtype)
    out = adasum.combine(a, b)
    assert rel_err(out, (a.double() + b.double()) / 2) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_formula_and_keeps_dtype_and_shape(dtype):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 5, generator=g).to(dtype), torch.randn(7, 5, generator=g).to(dtype)
    out = adasum.combine(a, b)
    assert out.dtype == dtype and out.shape == (7, 5)
    assert rel_err(out, reference(a, b)) < TOL[dtype]


def test_symmetric_and_homogeneous():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    assert torch.allclose(adasum.combine(a, b), adasum.combine(b, a), rtol=1e-15, atol=0)
    assert torch.allclose(adasum.combine(4 * a, 4 * b), 4 * adasum.combine(a, b), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_vector_leaves_the_other_unchanged(dtype):
    a = torch.randn(33).to(dtype)
    zero = torch.zeros(33, dtype=dtype)
    assert torch.equal(adasum.combine(a, zero), a)
    assert torch.equal(adasum.combine(zero, a), a)
    assert torch.equal(adasum.combine(zero, zero), zero)


def test_norm_below_the_guard_counts_as_zero():
    # |a|^2 = 1e-160 < sqrt(float64 tiny): a's coefficient is 1 instead of 1 - a.b / (2 |a|^2),
    # which would be 1 - 2e80 / 2e-160 here.
    a = torch.tensor([1e-80, 0.0], dtype=torch.float64)
    b = torch.tensor([2e80, 0.0], dtype=torch.float64)
    expected = a + (1 - 2.0 / (2 * 4e160)) * b
    assert torch.allclose(adasum.combine(a, b), expected, rtol=1e-15, atol=0)
    # Just above the guard the ordinary formula applies (the average of parallel vectors).
    c = torch.tensor([1e-76, 0.0], dtype=torch.float64)
    assert torch.allclose(adasum.combine(c, c), c, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_magnitudes_near_tiny_do_not_underflow(dtype):
    tiny = torch.finfo(dtype).tiny
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(50, generator=g) + 1) * tiny * 2
    b = (torch.rand(50, generator=g) + 1) * tiny * 2
    a, b = a.to(dtype), b.to(dtype)
    # Squared in the dtype these would flush to zero and give the plain sum.
    out = adasum.combine(a, b)
    assert rel_err(out, reference(a, b)) < TOL[dtype]
    assert rel_err(out, a.double() + b.double()) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitudes_near_sqrt_max_do_not_overflow(dtype):
    n = 1000
    # sqrt(max) / sqrt(n): every square is near max / n, so |a|^2 is near the dtype's max — it
    # overflows in the dtype itself for half precision and float32 but not in float64.
    big = math.sqrt(torch.finfo(dtype).max / n) * 0.9
    g = torch.Generator().manual_seed(4)
    a = (torch.rand(n, generator=g, dtype=torch.float64) * big).to(dtype)
    b = (torch.rand(n, generator=g, dtype=torch.float64) * big).to(dtype)
    out = adasum.combine(a, b)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(a, b)) < TOL[dtype]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_propagate(bad):
    a = torch.ones(4)
    b = torch.ones(4)
    b[2] = bad
    assert not torch.isfinite(adasum.combine(a, b)).all()


def test_non_contiguous_and_out():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(6, 8, generator=g).t()
    b = torch.randn(6, 8, generator=g).t()
    assert not a.is_contiguous()
    out = torch.empty(8, 6)
    result = adasum.combine(a, b, out=out)
    assert result is out
    assert rel_err(out, reference(a, b)) < 1e-6


def test_empty_tensors():
    assert adasum.combine(torch.empty(0), torch.empty(0)).shape == (0,)


@pytest.mark.parametrize(
    "tensor", [torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.complex64)]
)
def test_unsupported_dtypes_raise_type_error(tensor):
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        adasum.combine(tensor, tensor)


def test_mismatches_raise_value_error():
    with pytest.raises(ValueError, match="shape"):
        adasum.combine(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        adasum.combine(torch.ones(3), torch.ones(3, dtype=torch.float64))


def test_kernel_results_do_not_depend_on_the_thread_count():
    if ops._kernels is None:
        pytest.skip("C kernels not built")
    g = torch.Generator().manual_seed(7)
    n = 3 * (1 << 18) + 12345  # above the size where the kernels start threads
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    offsets = ops.offsets_of([100, n - 300, 200])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            partials = ops.segment_partials(a, b, offsets)
            out = torch.empty_like(a)
            ops.segment_combine(a, b, out, offsets, *ops.coefficients(partials))
            results.append((partials, out))
    finally:
        torch.set_num_threads(before)
    for partials, out in results[1:]:
        assert torch.equal(partials, results[0][0]) and torch.equal(out, results[0][1])
    exact = torch.stack([(a.double() * b.double()).sum(), (a.double() ** 2).sum(), (b.double() ** 2).sum()])
    assert torch.allclose(results[0][0].sum(1), exact, rtol=1e-12)
