"""The fused Triton kernels (:mod:`adasum._triton`) against the C kernels, without a GPU.

Triton compiles for a GPU it does not see (its wheel carries the NVIDIA assembler), so the
kernels are compiled for Ampere and Hopper here, and the combination's code is checked for
fused multiply-adds, which would change its rounding.

Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined) runs the
kernels on CPU tensors in NumPy. This file runs itself once as a script in a child interpreter
with that setting, over every layout of ``test_chunked`` and every dtype, and each test reads its
case's result: the combination bit for bit, the partial sums to float64 rounding, the partial
sums the same on a second call, and ``out`` aliasing an operand. On a GPU, ``test_cuda`` checks
the compiled kernels the same way.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from adasum import _ops as ops

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed"),
    pytest.mark.skipif(ops._kernels is None, reason="C kernels not built: nothing to compare with"),
]

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _case(dtype_name: str, layout: int) -> str | None:
    """Runs one case in the interpreter; returns what went wrong, or None."""
    from test_chunked import LAYOUTS, assert_partials_close, operands

    from adasum import _triton
    from conftest import same_bits

    numels = LAYOUTS[layout]
    a, b = operands(sum(numels), getattr(torch, dtype_name), seed=layout)
    offsets = ops.offsets_of(numels)
    want_partials = ops.segment_partials(a, b, offsets)
    ca, cb = ops.coefficients(want_partials)
    want = torch.empty_like(a)
    ops.segment_combine(a, b, want, offsets, ca, cb)

    got_partials = _triton.partials(a, b, offsets)
    try:
        assert_partials_close(want_partials, got_partials, a, b, numels)
    except AssertionError as e:
        return f"partial sums: {e}"
    if not same_bits(_triton.partials(a, b, offsets), got_partials):
        return "partial sums differ between two calls"
    got = torch.empty_like(a)
    _triton.combine(a, b, got, offsets, ca, cb)
    if not same_bits(got, want):
        differ = (got.view(-1, 1).view(torch.uint8) != want.view(-1, 1).view(torch.uint8)).any(dim=1)
        return f"combination: {int(differ.sum())} of {a.numel()} elements differ"
    in_place = b.clone()
    _triton.combine(a, in_place, in_place, offsets, ca, cb)
    if not same_bits(in_place, want):
        return "combination into an operand differs"
    if a.numel() > 1:  # NaN and Inf propagate as in the C kernels: the same NaN positions
        a[0], b[-1] = float("nan"), float("inf")
        ca, cb = ops.coefficients(ops.segment_partials(a, b, offsets))
        ops.segment_combine(a, b, want, offsets, ca, cb)
        _triton.combine(a, b, got, offsets, ca, cb)
        nan = torch.isnan(want)
        if not torch.equal(nan, torch.isnan(got)) or not same_bits(got[~nan], want[~nan]):
            return "combination with NaN and Inf differs"
    return None


_POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def _compiled(dtype: str, arch: int) -> str | None:
    """Compiles both kernels for ``arch`` (80: Ampere, 90: Hopper) with the library's options;
    returns what went wrong, or None."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adasum import _triton, _triton_kernels

    ptr, index = _POINTER[dtype], "*i64"
    target = GPUTarget("cuda", arch, 32)
    wide = dtype in ("float32", "float64")
    combine = triton.compile(ASTSource(
        fn=_triton_kernels.combine_kernel,
        signature={"a_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr, "ca_ptr": "*fp64", "cb_ptr": "*fp64",
                   "starts_ptr": index, "lengths_ptr": index, "segment_ptr": index,
                   "BLOCK": "constexpr", "WIDE": "constexpr", "BFLOAT16": "constexpr"},
        constexprs={"BLOCK": 4096, "WIDE": wide, "BFLOAT16": dtype == "bfloat16"},
    ), target=target, options=_triton.OPTIONS)
    partials = triton.compile(ASTSource(
        fn=_triton_kernels.partials_kernel,
        signature={"a_ptr": ptr, "b_ptr": ptr, "starts_ptr": index, "lengths_ptr": index, "sums_ptr": "*fp64",
                   "nblocks": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": 4096},
    ), target=target, options=_triton.OPTIONS)
    if not (combine.asm["cubin"] and partials.asm["cubin"]):
        return "no machine code"
    ptx, compute = combine.asm["ptx"], "f64" if wide else "f32"
    if f"mul.rn.{compute}" not in ptx or f"add.rn.{compute}" not in ptx:
        return f"no {compute} multiplication and addition in the combination"
    if "fma." in ptx:
        return f"{ptx.count('fma.')} fused multiply-adds in the combination"
    return None


def _child(interpret: bool) -> dict[str, str | None]:
    """Runs this file as a script in a fresh interpreter (Triton's LLVM never shares a process
    with TensorFlow's, which the test session may hold), with or without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_adasum_does_not_import_triton():
    # Triton's LLVM and TensorFlow's abort a process that loads both (found by the Keras tests).
    code = "import sys, adasum, adasum._ops, adasum.ddp, adasum.optim; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.fixture(scope="module")
def compiled() -> dict[str, str | None]:
    return _child(interpret=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia_gpus_without_fused_multiply_adds(compiled, dtype, arch):
    assert compiled[f"{dtype}/{arch}"] is None, compiled[f"{dtype}/{arch}"]


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    return _child(interpret=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", range(8))
def test_triton_kernels_match_the_c_kernels(interpreted, dtype, layout):
    from test_chunked import LAYOUTS

    assert len(LAYOUTS) == 8  # every layout is a case here
    assert interpreted[f"{dtype}/{layout}"] is None, interpreted[f"{dtype}/{layout}"]


if __name__ == "__main__":
    # The child: TRITON_INTERPRET decides whether the kernels are interpreted or compiled.
    from test_chunked import LAYOUTS

    if os.environ.get("TRITON_INTERPRET") == "1":
        print(json.dumps({f"{d}/{k}": _case(d, k) for d in DTYPES for k in range(len(LAYOUTS))}))
    else:
        print(json.dumps({f"{d}/{a}": _compiled(d, a) for d in DTYPES for a in (80, 90)}))
