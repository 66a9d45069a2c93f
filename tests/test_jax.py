"""The JAX backend (adasum.jax) against the PyTorch reference adasum.reduce.

Runs on 8 host CPU devices; skipped when JAX or Optax is not installed. The XLA flag that creates
the devices must be set before JAX is imported, hence the module-level setup.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

import adasum  # noqa: E402
from adasum import jax as adasum_jax  # noqa: E402
from adasum.jax._sums import compensated_sums  # noqa: E402

if jax.device_count() < 8:
    pytest.skip(
        "needs 8 host devices (JAX was imported before the XLA flag)", allow_module_level=True
    )

AXIS = "d"
#: unit roundoff times two (one unit in the last place at 1.0) per dtype
ULP = {
    np.dtype(np.float32): 2.0**-23,
    np.dtype(jnp.bfloat16): 2.0**-7,
    np.dtype(np.float16): 2.0**-10,
}


def _mesh(n: int):
    return jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n])


def _per_device(fn, stacked, n: int, *, jit: bool = True):
    """Run ``fn`` on device r with ``leaf[r]`` of every leaf of ``stacked``; return every
    device's output stacked on a leading axis, as numpy arrays."""

    def body(tree):
        out = fn(jax.tree.map(lambda x: x[0], tree))
        return jax.tree.map(lambda x: x[None], out)

    mesh = _mesh(n)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    if jit:
        mapped = jax.jit(mapped)
    result = mapped(jax.device_put(stacked, NamedSharding(mesh, P(AXIS))))
    return jax.tree.map(np.asarray, result)


def _all_reduce(stacked, n: int, *, jit: bool = True):
    return _per_device(lambda t: adasum_jax.all_reduce(t, AXIS), stacked, n, jit=jit)


def _to_torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype == jnp.bfloat16:  # numpy has no bfloat16 of its own; float32 holds it exactly
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


def _reference(stacked, n: int) -> list[np.ndarray]:
    """adasum.reduce over the devices' leaves, as float64 numpy arrays in leaf order."""
    leaves = jax.tree.leaves(stacked)
    out = adasum.reduce([[_to_torch(np.asarray(x[r])) for x in leaves] for r in range(n)])
    return [t.double().numpy() for t in out]


def _assert_identical_on_devices(outputs) -> None:
    for leaf in jax.tree.leaves(outputs):
        for r in range(1, leaf.shape[0]):
            np.testing.assert_array_equal(leaf[r], leaf[0], err_msg=f"device {r} != device 0")


def _assert_matches_reference(outputs, stacked, n: int, ulps: float) -> None:
    """Each leaf within ``ulps`` units of its dtype's precision of the float64-accumulated
    PyTorch reference, measured against the leaf's largest element in the inputs or the result
    (the terms ca*a and cb*b may cancel, so the result alone is no scale for the error)."""
    reference = _reference(stacked, n)
    for got, x, want in zip(jax.tree.leaves(outputs), jax.tree.leaves(stacked), reference):
        assert got.dtype == x.dtype and got.shape[1:] == x.shape[1:]
        scale = max(np.abs(want).max(), np.abs(x.astype(np.float64)).max()) if want.size else 0.0
        atol = ulps * ULP[np.dtype(x.dtype)] * scale
        np.testing.assert_allclose(got[0].astype(np.float64), want, rtol=0, atol=atol)


def _mixed_tree(rng: np.random.Generator, n: int) -> dict:
    """One pytree per device, stacked: nested containers, three dtypes, a scalar leaf, and
    layers whose scales differ by orders of magnitude (so a global dot product would fail)."""

    def normal(*shape, dtype=np.float32, scale=1.0):
        return (scale * rng.standard_normal((n, *shape))).astype(dtype)

    return {
        "dense": {"w": normal(17, 9), "b": normal(9, scale=1e-3)},
        "half": [normal(33, dtype=np.float16), normal(5, 4, dtype=jnp.bfloat16, scale=50.0)],
        "scalar": normal(),
        "odd": (normal(1), normal(3, 7, 2, scale=1e3)),
    }


@pytest.mark.parametrize("n", range(2, 9))
def test_matches_reference_for_any_device_count(n: int) -> None:
    stacked = _mixed_tree(np.random.default_rng(n), n)
    out = _all_reduce(stacked, n)
    assert jax.tree.structure(out) == jax.tree.structure(stacked)
    _assert_identical_on_devices(out)
    _assert_matches_reference(out, stacked, n, ulps=4)


def test_order_is_the_rule_4_tree_not_another_one() -> None:
    """Six devices whose vectors partly agree: the fold-then-tree order gives a result that a
    plain balanced tree over all six or a left-to-right chain would not."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(64)
    stacked = np.stack([base + rng.standard_normal(64) * (r + 1) for r in range(6)]).astype(np.float32)
    out = _all_reduce(stacked, 6)[0]
    torch_rows = [torch.from_numpy(row) for row in stacked]
    chain = torch_rows[0]
    for row in torch_rows[1:]:
        chain = adasum.combine(chain, row)
    assert np.abs(out - chain.numpy()).max() > 1e-3
    np.testing.assert_allclose(out, adasum.reduce(torch_rows).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [3, 4])
def test_zero_layers(n: int) -> None:
    """A zero vector leaves the others unchanged; an all-zero layer stays zero (no NaN)."""
    rng = np.random.default_rng(1)
    partly = rng.standard_normal((n, 10)).astype(np.float32)
    partly[1] = 0.0
    stacked = {"partly": partly, "all": np.zeros((n, 6), np.float32), "one": np.zeros((n, 4), np.float32)}
    stacked["one"][n - 1] = rng.standard_normal(4)
    out = _all_reduce(stacked, n)
    np.testing.assert_array_equal(out["all"][0], 0.0)
    np.testing.assert_array_equal(out["one"][0], stacked["one"][n - 1])
    _assert_matches_reference(out, stacked, n, ulps=4)


def test_extreme_magnitudes_do_not_overflow_float32_sums() -> None:
    """Squares of 1e25 overflow float32 and squares of 1e-30 underflow it; the power-of-two
    scaling keeps the float32 accumulation finite and accurate."""
    rng = np.random.default_rng(2)
    stacked = {
        "huge": (1e25 * rng.standard_normal((5, 8))).astype(np.float32),
        "tiny": (1e-30 * rng.standard_normal((5, 8))).astype(np.float32),
        "mixed": np.concatenate(
            [1e-30 * rng.standard_normal((5, 3)), 1e15 * rng.standard_normal((5, 3))], axis=1
        ).astype(np.float32),
    }
    # One device's vector (elements ~1e-22, squares below float32's range) next to the others.
    stacked["mixed"][2] *= np.float32(1e-37)
    out = _all_reduce(stacked, 5)
    for leaf in jax.tree.leaves(out):
        assert np.isfinite(leaf).all()
    _assert_matches_reference(out, stacked, 5, ulps=4)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tiny_vectors_beside_zero_pieces_are_combined_not_summed(n: int) -> None:
    """A device whose piece of a leaf holds only zeros must not set the scale of the other
    devices' pieces: with float32 accumulation, nearly parallel vectors of 1e-20 next to such a
    piece had their squared norms scaled below the zero guard, and were summed, not combined."""
    rng = np.random.default_rng(9)
    stacked = {}
    for scale in (1e-20, 1e-30):
        leaf = np.zeros((n, 16), np.float32)
        leaf[:, :3] = scale * (1 + rng.random((n, 3)))  # nonzero in the first rows only
        stacked[f"front {scale:g}"] = leaf
        stacked[f"back {scale:g}"] = leaf[:, ::-1].copy()
    out = _all_reduce(stacked, n)
    _assert_identical_on_devices(out)
    _assert_matches_reference(out, stacked, n, ulps=4)


def test_subnormals_are_flushed_to_zero_on_cpu_as_documented() -> None:
    """XLA on CPU flushes subnormals to zero, inputs and results (JAX's choice; docs/jax.md
    says so and what to do): float32 and bfloat16 leaves that the PyTorch reference combines
    into subnormals give 0 here, while float16 leaves, combined in float32, keep theirs. If
    XLA changes this, the documentation must change with it."""
    if jax.default_backend() != "cpu":
        pytest.skip("pins the CPU's floating-point mode")
    stacked = {
        "f32 inputs": np.array([[1e-40], [2e-40]], np.float32),  # the reference: 1.5e-40
        "f32 result": np.array([[2e-38], [-1.9e-38]], np.float32),  # normal in, 5e-40 out
        "bf16": np.array([[1e-40], [2e-40]], jnp.bfloat16),
        "f16": np.array([[1e-6, 1e-7], [2e-6, 3e-7]], np.float16),  # subnormal float16 values
    }
    out = _all_reduce(stacked, 2)
    reference = dict(zip(sorted(stacked), _reference(stacked, 2)))
    for name in ("f32 inputs", "f32 result", "bf16"):
        assert (reference[name] != 0).all() and (out[name] == 0).all(), name
    np.testing.assert_array_equal(out["f16"][0].astype(np.float64), reference["f16"])


def test_non_finite_values_propagate_like_the_reference() -> None:
    stacked = np.random.default_rng(3).standard_normal((4, 2, 6)).astype(np.float32)
    stacked[2, 0, 3] = np.nan
    stacked[1, 1, 0] = np.inf
    out = _all_reduce(list(stacked.transpose(1, 0, 2)), 4)
    reference = _reference(list(stacked.transpose(1, 0, 2)), 4)
    for got, want in zip(out, reference):
        assert not np.isfinite(got[0]).all()
        np.testing.assert_array_equal(np.isfinite(got[0]), np.isfinite(want))


def test_works_without_jit_and_under_pmap() -> None:
    stacked = np.random.default_rng(4).standard_normal((3, 11)).astype(np.float32)
    jitted = _all_reduce(stacked, 3)
    # Eager shard_map compiles every primitive on its own: two devices keep that short.
    np.testing.assert_array_equal(_all_reduce(stacked[:2], 2, jit=False), _all_reduce(stacked[:2], 2))
    pmapped = jax.pmap(
        lambda x: adasum_jax.all_reduce(x, AXIS), axis_name=AXIS, devices=jax.devices()[:3]
    )
    np.testing.assert_array_equal(np.asarray(pmapped(stacked)), jitted)


def test_single_device_and_empty_leaves_are_returned_unchanged() -> None:
    x = np.arange(5, dtype=np.float32)[None]
    np.testing.assert_array_equal(_all_reduce(x, 1), x)
    out = _all_reduce({"empty": np.zeros((3, 0), np.float32), "x": np.ones((3, 2), np.float32)}, 3)
    assert out["empty"].shape == (3, 0)


def test_rejects_integer_leaves() -> None:
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        _all_reduce(np.ones((2, 3), np.int32), 2)


def test_result_is_invariant_over_the_axis() -> None:
    """Like psum's, the result may leave shard_map with a replicated out_spec."""
    mesh = _mesh(3)
    fn = jax.jit(
        jax.shard_map(
            lambda x: adasum_jax.all_reduce(x[0], AXIS), mesh=mesh, in_specs=P(AXIS), out_specs=P()
        )
    )
    stacked = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    stacked = jax.device_put(stacked, NamedSharding(mesh, P(AXIS)))
    np.testing.assert_array_equal(np.asarray(fn(stacked)), _all_reduce(stacked, 3)[0])


# ------------------------------------------------------------------------------------------
# Accumulation precision


def test_float32_accumulation_is_compensated() -> None:
    """2^20 products: a sequential float32 sum is off by ~1e-4 and a pairwise one by ~1e-7;
    the compensated sums must be within two roundings of the exact sum of the products."""
    rng = np.random.default_rng(6)
    length = (1 << 20) + 3  # not a multiple of the run count either
    terms = [rng.random(length).astype(np.float32), rng.standard_normal(length).astype(np.float32) + 0.01]
    hi, lo = jax.jit(compensated_sums)([jnp.asarray(t) for t in terms])
    for t, h, lo_t in zip(terms, np.asarray(hi, np.float64), np.asarray(lo, np.float64)):
        exact = math.fsum(t.astype(np.float64).tolist())
        sequential = np.cumsum(t, dtype=np.float32)[-1]
        bound = 2 * 2.0**-24 * abs(exact) + 2.0**-40 * np.abs(t).sum()
        assert abs(float(sequential) - exact) > 10 * bound  # the data defeats a plain sum
        assert abs(float(np.float32(h + lo_t)) - exact) <= bound


def test_float32_dot_products_are_accurate_end_to_end() -> None:
    """Two long, nearly orthogonal vectors: the coefficients depend on a dot product that
    cancels; the combined vector still agrees with the float64 reference to float32 precision."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal(1 << 18)
    b = rng.standard_normal(1 << 18)
    b -= (a @ b) / (a @ a) * a * 0.999  # almost orthogonal to a
    stacked = np.stack([a, b]).astype(np.float32)
    _assert_matches_reference(_all_reduce(stacked, 2), stacked, 2, ulps=2)


_X64_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {tests!r})
import test_jax as t
import numpy as np
import jax.numpy as jnp
assert t.adasum_jax.accumulation_dtype() == np.float64
rng = np.random.default_rng(8)
for n in (3, 8):
    stacked = {{
        "f64": rng.standard_normal((n, 19, 3)),
        "f32": rng.standard_normal((n, 40)).astype(np.float32),
        "bf16": rng.standard_normal((n, 12)).astype(jnp.bfloat16),
        "f16": rng.standard_normal((n, 7)).astype(np.float16),
        "zero": np.zeros((n, 5), np.float32),
    }}
    out = t._all_reduce(stacked, n)
    t._assert_identical_on_devices(out)
    for name, got, want in zip(sorted(stacked), jax.tree.leaves(out), t._reference(stacked, n)):
        got = got[0].astype(np.float64)
        if name == "f64":  # float64 sums in another order: equal to a few float64 ulps
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
        else:  # same float64 coefficients, same rounding of the combination: same bits
            np.testing.assert_array_equal(got, want, err_msg=name)
# Subnormal inputs count as zero on CPU with x64 too (XLA's flush-to-zero; docs/jax.md).
if jax.default_backend() == "cpu":
    assert (t._all_reduce(np.array([[1e-40], [2e-40]], np.float32), 2) == 0).all()
print("x64 ok")
"""


def test_x64_accumulates_in_float64_and_matches_the_reference_bitwise() -> None:
    script = _X64_SCRIPT.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "x64 ok" in done.stdout, done.stderr[-3000:]


def test_public_names() -> None:
    public = {"all_reduce", "adasum_deltas", "adasum_gradients", "accumulation_dtype", "SUPPORTED_DTYPES"}
    assert set(adasum_jax.__all__) == public
    assert {name for name in vars(adasum_jax) if not name.startswith("_")} == public


def test_importing_adasum_does_not_import_jax() -> None:
    code = "import sys, adasum; assert 'jax' not in sys.modules and 'optax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------------------
# Optax transformations


def _grads_and_params(n: int, rng: np.random.Generator):
    params = {"w": rng.standard_normal((6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    grads = jax.tree.map(lambda p: rng.standard_normal((n, *p.shape)).astype(np.float32), params)
    return params, grads


def test_delta_mode_reduces_each_devices_optimizer_step() -> None:
    """adasum_deltas(adam): every device takes its own Adam step; the deltas are reduced by Adasum;
    the Adam moments stay per device. Two steps against an independent per-device computation."""
    n, lr = 3, 0.01
    rng = np.random.default_rng(9)
    params, _ = _grads_and_params(n, rng)
    steps = [_grads_and_params(n, rng)[1] for _ in range(2)]
    tx = adasum_jax.adasum_deltas(optax.adam(lr), AXIS)

    state = jax.tree.map(lambda s: np.stack([np.asarray(s)] * n), tx.init(params))
    jax_params = params
    for grads in steps:
        def step(block, p=jax_params):
            updates, new_state = tx.update(block["g"], block["s"], p)
            return {"u": updates, "s": new_state}

        out = _per_device(step, {"g": grads, "s": state}, n)
        _assert_identical_on_devices(out["u"])
        state = out["s"]
        jax_params = optax.apply_updates(jax_params, jax.tree.map(lambda u: u[0], out["u"]))

    # The same thing by hand: Adam per device, adasum.reduce of the deltas.
    inner = optax.adam(lr)
    local = [inner.init(params) for _ in range(n)]
    ref_params = jax.tree.map(np.asarray, params)
    for grads in steps:
        deltas = []
        for r in range(n):
            delta, local[r] = inner.update(jax.tree.map(lambda g: g[r], grads), local[r], ref_params)
            deltas.append(delta)
        names = sorted(ref_params)
        reduced = adasum.reduce([[torch.from_numpy(np.array(d[k])) for k in names] for d in deltas])
        ref_params = {k: ref_params[k] + c.numpy() for k, c in zip(names, reduced)}
    for k in ref_params:
        np.testing.assert_allclose(np.asarray(jax_params[k]), ref_params[k], rtol=0, atol=1e-6)
    # Moments are per device: device r's first moment is Adam's on device r's gradients alone.
    for r in range(n):
        np.testing.assert_allclose(state[0].mu["w"][r], np.asarray(local[r][0].mu["w"]), atol=1e-7)
    assert not np.allclose(state[0].mu["w"][0], state[0].mu["w"][1])


def test_gradient_mode_is_sgd_on_the_adasum_of_gradients() -> None:
    n, lr = 5, 0.1
    params, grads = _grads_and_params(n, np.random.default_rng(10))
    tx = optax.chain(adasum_jax.adasum_gradients(AXIS), optax.sgd(lr))
    state = tx.init(params)
    out = _per_device(lambda g: tx.update(g, state, params)[0], grads, n)
    _assert_identical_on_devices(out)
    for got, want in zip(jax.tree.leaves(out), _reference(grads, n)):
        np.testing.assert_allclose(got[0], -lr * want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Training: JAX on 6 devices and the PyTorch simulation with adasum.reduce agree


def _digits(n: int, batch: int, steps: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(11).permutation(len(y))
    idx = np.resize(order, steps * n * batch).reshape(steps, n, batch)
    return x, y.astype(np.int32), idx


def _init_mlp(rng: np.random.Generator) -> dict:
    return {
        "w1": (rng.standard_normal((64, 32)) / 8).astype(np.float32),
        "b1": np.zeros(32, np.float32),
        "w2": (rng.standard_normal((32, 10)) / 6).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }


def _jax_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _torch_loss(params, x, y):
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return torch.nn.functional.cross_entropy(hidden @ params["w2"] + params["b2"], y)


def test_digits_training_agrees_with_the_pytorch_simulation() -> None:
    n, batch, steps, lr = 6, 16, 30, 0.5
    x, y, idx = _digits(n, batch, steps)
    start = _init_mlp(np.random.default_rng(12))
    names = sorted(start)

    # JAX: gradient mode inside shard_map, parameters replicated. The gradient is taken with
    # respect to a device-varying view of the parameters: with respect to the replicated ones,
    # JAX would sum the gradients over the devices itself.
    tx = optax.chain(adasum_jax.adasum_gradients(AXIS), optax.sgd(lr))
    mesh = _mesh(n)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))
    def train_step(params, opt_state, xb, yb):
        local = jax.lax.pcast(params, AXIS, to="varying")
        grads = jax.grad(_jax_loss)(local, xb[0], yb[0])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.tree.map(jnp.asarray, start), tx.init(start)
    sharded = NamedSharding(mesh, P(AXIS))
    for t in range(steps):
        xb, yb = jax.device_put((x[idx[t]], y[idx[t]]), sharded)
        params, opt_state = train_step(params, opt_state, xb, yb)

    # PyTorch: the same steps simulated with adasum.reduce.
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    for t in range(steps):
        per_rank = []
        for r in range(n):
            rows = idx[t, r]
            loss = _torch_loss(tparams, torch.from_numpy(x[rows]), torch.from_numpy(y[rows]).long())
            per_rank.append(torch.autograd.grad(loss, [tparams[k] for k in names]))
        reduced = adasum.reduce(per_rank)
        with torch.no_grad():
            for k, g in zip(names, reduced):
                tparams[k] -= lr * g

    for k in names:
        np.testing.assert_allclose(np.asarray(params[k]), tparams[k].detach().numpy(), atol=2e-5)
    before = float(_jax_loss(jax.tree.map(jnp.asarray, start), x, y))
    after = float(_jax_loss(params, x, y))
    assert after < 0.5 * before
