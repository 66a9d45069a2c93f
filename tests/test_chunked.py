"""The PyTorch-ops path of the operator (CUDA buffers; CPU without the C kernels) against the
C kernels, reached through the public entry points with ``_kernels`` switched off: the
combination bit for bit, the partial sums to float64 rounding, and its extra
memory against the half-buffer target, measured from the CPU allocator's events."""

import sys
from pathlib import Path

import pytest
import torch

from adasum import _chunked
from adasum import _ops as ops
from conftest import same_bits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import TARGET, peak_extra_bytes, torch_path  # noqa: E402

pytestmark = pytest.mark.skipif(ops._kernels is None, reason="C kernels not built: nothing to compare with")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
B = _chunked.BLOCK
# Layer sizes: empty layers anywhere, layers of one element, layers ending on and next to block
# boundaries, layers spanning several blocks, and many small ones.
LAYOUTS = [
    [0],
    [7],
    [0, 0, 5, 0],
    [0, 10, 991],
    [B],
    [B - 1, 1, B + 1, 0, 3 * B + 17],
    [1] * 300 + [2 * B] + [0] * 5 + [B // 2] * 7,
    [5 * B + 3, 0, 11, B * 2 - 5, 1],
]


def operands(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


def both_paths(monkeypatch, a, b, numels):
    """``(partials, combined)`` from the C kernels and from the PyTorch-ops path, the latter
    through the public entry points with ``_kernels`` switched off; both combine with the
    kernels' coefficients, so only the combination itself is compared."""
    offsets = ops.offsets_of(numels)
    fast_partials = ops.segment_partials(a, b, offsets)
    ca, cb = ops.coefficients(fast_partials)
    fast = torch.empty_like(a)
    ops.segment_combine(a, b, fast, offsets, ca, cb)
    with monkeypatch.context() as m:
        m.setattr(ops, "_kernels", None)
        slow_partials = ops.segment_partials(a, b, offsets)
        slow = torch.empty_like(a)
        ops.segment_combine(a, b, slow, offsets, ca, cb)
    return (fast_partials, fast), (slow_partials, slow)


def assert_partials_close(fast, slow, a, b, numels):
    """Within float64 rounding: the two summation orders differ by at most a few units of
    2^-53 times the sum of the terms' magnitudes for each block's sequential sum (blocks of
    4096 terms give about 5e-13), so 1e-12 of that sum bounds it."""
    offsets = ops.offsets_of(numels).tolist()
    x, y = a.double(), b.double()
    for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        scale = torch.stack([(x[lo:hi] * y[lo:hi]).abs().sum(), (x[lo:hi] ** 2).sum(), (y[lo:hi] ** 2).sum()])
        assert ((fast[:, s] - slow[:, s]).abs() <= 1e-12 * scale).all(), (s, fast[:, s], slow[:, s])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_torch_path_matches_the_kernels_with_small_chunks(monkeypatch, dtype, layout):
    # Chunks of one block: every layout above is cut into many chunks, splitting layers.
    monkeypatch.setitem(_chunked._MAX_CHUNK, "cpu", B)
    numels = LAYOUTS[layout]
    a, b = operands(sum(numels), dtype, seed=layout)
    (fast_p, fast), (slow_p, slow) = both_paths(monkeypatch, a, b, numels)
    assert same_bits(fast, slow)
    assert_partials_close(fast_p, slow_p, a, b, numels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path_matches_the_kernels_at_natural_chunk_sizes(monkeypatch, dtype):
    numels = [300_000, 1, 0, 123_457, 40_000]
    a, b = operands(sum(numels), dtype, seed=11)
    chunk = _chunked.chunk_elements(a.numel(), a.element_size(), 32, a.device)
    assert len(_chunked.Blocks(ops.offsets_of(numels), chunk).chunks) > 5
    (fast_p, fast), (slow_p, slow) = both_paths(monkeypatch, a, b, numels)
    assert same_bits(fast, slow)
    assert_partials_close(fast_p, slow_p, a, b, numels)


def test_partials_are_the_same_bits_on_every_call_and_thread_count(monkeypatch):
    monkeypatch.setattr(ops, "_kernels", None)
    numels = [200_000, 3, 70_001]
    a, b = operands(sum(numels), torch.float32, seed=12)
    offsets = ops.offsets_of(numels)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(ops.segment_partials(a, b, offsets))
    finally:
        torch.set_num_threads(before)
    assert all(same_bits(r, results[0]) for r in results)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_guard_and_non_finite_layers(monkeypatch, dtype):
    monkeypatch.setitem(_chunked._MAX_CHUNK, "cpu", B)
    numels = [B + 5, 9, 2 * B, 100, 3 * B]
    a, b = operands(sum(numels), dtype, seed=13)
    starts = ops.offsets_of(numels).tolist()
    a[starts[0] : starts[1]] = 0  # a zero layer: the result is b's
    a[starts[1] : starts[2]] = 1e-300 if dtype == torch.float64 else 0  # below the guard
    b[starts[2] + 77] = float("nan")
    b[starts[3] + 4] = float("inf")
    (fast_p, fast), (slow_p, slow) = both_paths(monkeypatch, a, b, numels)
    nan = torch.isnan(fast.double())
    assert torch.equal(nan, torch.isnan(slow.double()))
    # NaN payloads of the 16-bit conversions may differ; every other element is the same bits.
    assert same_bits(fast[~nan], slow[~nan])
    assert same_bits(slow[starts[0] : starts[1]], b[starts[0] : starts[1]])
    if dtype == torch.float64:
        assert same_bits(slow[starts[1] : starts[2]], a[starts[1] : starts[2]] + b[starts[1] : starts[2]])
    assert not torch.isfinite(slow[starts[2] : starts[4]]).any()
    assert torch.isfinite(slow[starts[4] :]).all()
    finite = torch.isfinite(fast_p).all(0)
    assert torch.equal(finite, torch.isfinite(slow_p).all(0))
    assert finite.tolist() == [True, True, False, False, True]


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_may_be_either_operand(monkeypatch, dtype):
    monkeypatch.setattr(ops, "_kernels", None)
    monkeypatch.setitem(_chunked._MAX_CHUNK, "cpu", B)
    numels = [3 * B + 1, 17, B]
    a, b = operands(sum(numels), dtype, seed=14)
    offsets = ops.offsets_of(numels)
    ca, cb = ops.coefficients(ops.segment_partials(a, b, offsets))
    expected = torch.empty_like(a)
    ops.segment_combine(a, b, expected, offsets, ca, cb)
    for target in ("a", "b"):
        x, y = a.clone(), b.clone()
        ops.segment_combine(x, y, x if target == "a" else y, offsets, ca, cb)
        assert same_bits(x if target == "a" else y, expected)


def test_strided_buffers_take_the_torch_path(monkeypatch):
    numels = [B + 3, 0, 500]
    wide_a, wide_b = operands(2 * sum(numels), torch.float32, seed=15)
    a, b = wide_a[::2], wide_b[::2]
    (fast_p, fast), _ = both_paths(monkeypatch, a.contiguous(), b.contiguous(), numels)
    offsets = ops.offsets_of(numels)
    partials = ops.segment_partials(a, b, offsets)  # not contiguous: no C kernels
    out = torch.empty_like(fast)
    ops.segment_combine(a, b, out, offsets, *ops.coefficients(fast_p))
    assert same_bits(out, fast)
    assert_partials_close(fast_p, partials, a, b, numels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numels", [[1 << 18], [1000] * 262 + [144], [100_000, 3, 0, 162_141]], ids=["one", "many", "uneven"])
def test_extra_memory_is_at_most_half_the_buffer(dtype, numels):
    a, b = operands(sum(numels), dtype, seed=16)
    partials, combine = torch_path(a, b, numels)
    buffer = a.numel() * a.element_size()
    assert peak_extra_bytes(partials, a.device) <= TARGET * buffer
    assert peak_extra_bytes(combine, a.device) <= TARGET * buffer


@pytest.mark.parametrize("dtype", DTYPES)
def test_extra_memory_of_a_small_buffer_is_a_fixed_floor(dtype):
    # One block's working set at most (32 bytes per element: the float32 and float64
    # combination's), plus the few numbers of bookkeeping per block and layer.
    a, b = operands(5000, dtype, seed=17)
    for step in torch_path(a, b, [4000, 0, 1000]):
        assert peak_extra_bytes(step, a.device) <= 1.05 * _chunked.BLOCK * 32


def test_the_measurement_sees_temporaries_inside_ops():
    # The measurement replays the allocator's events, so an op's hidden temporary counts: adding
    # a float32 tensor to a float64 one converts it first (CPU), then writes a float64 result.
    x = torch.ones(1 << 16)
    assert peak_extra_bytes(lambda: x + x.double(), x.device) == 3 * 8 * (1 << 16)
