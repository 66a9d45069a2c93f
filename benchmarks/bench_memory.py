"""The arithmetic paths that do not use the C kernels, the chunked PyTorch-ops path (CUDA
buffers without Triton, CPU without the C kernels) and, on a GPU with Triton, the fused Triton
kernels: their extra memory against the half-buffer target, and their time against ``torch.add``.

    python benchmarks/bench_memory.py                  # CPU, the C kernels switched off
    python benchmarks/bench_memory.py --device cuda    # a GPU (scripts/gpu-check.sh runs this)

Extra memory is the high-water mark of the bytes allocated during one call above what was
allocated before it (the result included), divided by the bytes of one operand buffer. On CPU it
comes from the profiler's allocation events (every allocation and free of PyTorch's CPU
allocator, temporaries inside an op included) replayed in time order; on CUDA from the caching
allocator's own peak counter. Times are medians of interleaved runs, written to a preallocated
output (no page faults timed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from adasum import _chunked, _ops, _triton

#: The target: at most half of one operand buffer's bytes.
TARGET = 0.5


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the high-water mark of ``fn()`` above those allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The profiler's event tree holds every allocation and free of the CPU allocator, those
    # inside an op included, with +bytes or -bytes; their running sum in time order is the
    # memory held at each moment (the flat ``prof.events()`` folds them into the ops).
    pending, allocations = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(allocations):
        held += size
        peak = max(peak, held)
    return peak


def steps(path, a: torch.Tensor, b: torch.Tensor, numels: list[int]) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(partials, combine)``: the two steps of ``path`` (:mod:`adasum._chunked` or
    :mod:`adasum._triton`, called directly, so the C kernels are never used) on ``a`` and
    ``b``, the combination written into ``a``."""
    offsets = _ops.offsets_of(numels)
    ca, cb = _ops.coefficients(path.partials(a, b, offsets))
    return (
        lambda: path.partials(a, b, offsets),
        lambda: path.combine(a, b, a, offsets, ca, cb),
    )


def torch_path(a: torch.Tensor, b: torch.Tensor, numels: list[int]) -> tuple[Callable[[], object], Callable[[], object]]:
    """:func:`steps` of the chunked PyTorch-ops path."""
    return steps(_chunked, a, b, numels)


def paths(device: torch.device) -> dict[str, object]:
    """The paths that serve buffers on ``device`` without the C kernels, by name."""
    found = {"chunked": _chunked}
    if _triton.available(torch.empty(0, device=device)):
        found["triton"] = _triton
    return found


def layouts(n: int) -> dict[str, list[int]]:
    """Layer sizes summing to ``n``: one layer, a few uneven ones, and many small ones."""
    uneven = [n // 2 + n // 7, 7, 0, n // 5, 1]
    return {
        "one layer": [n],
        "5 uneven layers": uneven + [n - sum(uneven)],
        f"{n // 1000} layers of 1000": [1000] * (n // 1000) + [n % 1000],
    }


def memory_rows(n: int, device: torch.device) -> list[tuple[str, str, str, float, float]]:
    """``(path, layout, dtype, partials ratio, combine ratio)`` for every path, layout and dtype."""
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        a = torch.randn(n, device=device).to(dtype)
        b = torch.randn(n, device=device).to(dtype)
        buffer = a.numel() * a.element_size()
        for path_name, path in paths(device).items():
            for name, numels in layouts(n).items():
                partials, combine = steps(path, a, b, numels)
                rows.append((path_name, name, str(dtype).removeprefix("torch."),
                             peak_extra_bytes(partials, device) / buffer, peak_extra_bytes(combine, device) / buffer))
    return rows


def time_rows(n: int, device: torch.device, reps: int) -> dict[str, float]:
    """Median milliseconds of each path's partials and combine and of ``torch.add`` on two
    float32 buffers, interleaved."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    out = torch.empty_like(a)
    offsets = _ops.offsets_of([n])
    fns = {}
    for name, path in paths(device).items():
        ca, cb = _ops.coefficients(path.partials(a, b, offsets))
        fns[f"{name} partials"] = lambda path=path: path.partials(a, b, offsets)
        fns[f"{name} combine"] = lambda path=path, ca=ca, cb=cb: path.combine(a, b, out, offsets, ca, cb)
    fns["torch.add"] = lambda: torch.add(a, b, out=out)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:  # the first round warms up the allocator and compiles the kernels
                samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-exponent", type=int, default=22, help="memory rows: 2^N elements")
    parser.add_argument("--time-exponent", type=int, default=None, help="time rows: 2^N float32 (default 24 on CPU, 26 on CUDA)")
    parser.add_argument("--reps", type=int, default=11)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    time_exp = args.time_exponent or (26 if device.type == "cuda" else 24)

    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")
    print(f"\nExtra memory, 2^{args.memory_exponent} elements (target <= {TARGET}x one buffer)\n")
    print("| path | layout | dtype | partials extra / buffer | combine extra / buffer |")
    print("|---|---|---|---:|---:|")
    worst = 0.0
    for path, name, dtype, p, c in memory_rows(1 << args.memory_exponent, device):
        worst = max(worst, p, c)
        print(f"| {path} | {name} | {dtype} | {p:.3f} | {c:.3f} |", flush=True)
    print(f"\nworst ratio {worst:.3f}: {'within' if worst <= TARGET else 'ABOVE'} the target of {TARGET}")
    print(f"(a buffer too small for the bound may use one block's working set, at most {_chunked.BLOCK * 32 // 1024} KiB)")

    ms = time_rows(1 << time_exp, device, args.reps)
    for name in paths(device):  # the whole operator: both steps, one after the other
        ms[f"{name} partials + combine"] = ms[f"{name} partials"] + ms[f"{name} combine"]
    print(f"\nTime, 2^{time_exp} float32, one layer, median of {args.reps} interleaved runs\n")
    print("| step | ms | / torch.add |")
    print("|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / ms['torch.add']:.2f}x |")


if __name__ == "__main__":
    main()
