"""Where adasum.jax.all_reduce spends its time against jax.lax.psum, stage by stage, on host
devices.

    python benchmarks/profile_jax.py [--devices 8] [--repeats 15] [--x64] [--quick]

The collective is one traced function, so its stages cannot be timed from inside a compiled
call. Instead the script compiles prefixes of it: while tracing, the stages that
``adasum.jax._collective`` calls (each ``ppermute`` exchange, the partial sums ``_partials``,
the ``all_gather`` of the partials, ``_combine_arrays`` with the totals and coefficients before
it, and the final ``all_gather`` of the rows) are wrapped, and prefix k stops the trace at the
k-th stage and returns that stage's result. Each stage consumes the one before, so nothing
earlier is dead code. All prefixes, the whole collective and ``psum`` run interleaved; a
stage's time is the difference of the medians of consecutive prefixes (noise can make a small
one negative). XLA's own cost analysis of each prefix gives the bytes each stage moves through
memory, which does not depend on the load of the machine.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from _jax_host import parse_host_args

ARGS = parse_host_args(__doc__.splitlines()[0], quick="one small case, 3 repeats (a smoke test)")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", ARGS.x64)

import adasum.jax._collective as collective  # noqa: E402
from adasum.jax import accumulation_dtype, all_reduce  # noqa: E402

#: name -> shapes of the float32 leaves every device holds (bench_jax.py's largest cases)
CASES = {
    "1 x 2^20": [(1 << 20,)],
    "1 x 2^22": [(1 << 22,)],
    "MLP, 6 leaves, 1.1M": [(784, 1024), (1024,), (1024, 256), (256,), (256, 10), (10,)],
}
QUICK_CASES = {"1 x 2^16": [(1 << 16,)]}
REST = "rest (row selection, unpadding)"


class _Stop(Exception):
    """Ends a prefix's trace, carrying the stage's result."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _Stages:
    """The stage wrappers, active while one prefix is traced: they count the stages, name them,
    and stop the trace at stage ``stop``."""

    def __init__(self, stop: int | None) -> None:
        self.stop, self.names = stop, []
        self._exchanges = self._gathers = 0

    def _stage(self, name: str, value: Any) -> Any:
        self.names.append(name)
        if self.stop is not None and len(self.names) == self.stop:
            raise _Stop(value)
        return value

    def ppermute(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
            self._exchanges += 1
            megabytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(x)) / 1e6
            return self._stage(f"exchange {self._exchanges} ppermute ({megabytes:.2f} MB)", real(x, *args, **kwargs))

        return wrapper

    def all_gather(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
            # The rows' gather is the one that makes the result invariant over the axis.
            final = kwargs.get("to") == "invarying"
            name = "final all_gather of the rows" if final else f"exchange {self._exchanges} all_gather of the partials"
            return self._stage(name, real(x, *args, **kwargs))

        return wrapper

    def named(self, label: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._stage(f"exchange {self._exchanges} {label}", real(*args, **kwargs))

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = (jax.lax.ppermute, jax.lax.all_gather, collective._partials, collective._combine_arrays)
        jax.lax.ppermute = self.ppermute(saved[0])
        jax.lax.all_gather = self.all_gather(saved[1])
        collective._partials = self.named("partial sums", saved[2])
        collective._combine_arrays = self.named("totals, coefficients, combination", saved[3])
        try:
            yield
        finally:
            jax.lax.ppermute, jax.lax.all_gather, collective._partials, collective._combine_arrays = saved


def _prefix(
    stop: int | None, mesh: jax.sharding.Mesh, data: list[jax.Array], *, invariant: bool = False
) -> tuple[Callable, list[str]]:
    """The collective up to stage ``stop`` (None: all of it, traced with the wrappers, which
    only name the stages), compiled; and the names of the stages the trace met. ``invariant``:
    the stage's result is the same on every device (the final all-gather), and leaves the
    shard_map as the collective's does, replicated, so that no copy is counted that the
    collective does not make."""
    stages = _Stages(stop)

    def body(tree: list[jax.Array]) -> Any:
        local = [x[0] for x in tree]
        if stop == 0:
            return [x[None] for x in local]
        try:
            out = all_reduce(local, "d")
        except _Stop as stopped:
            out = stopped.value
        # Partial results differ per device: each device returns its own.
        return out if invariant else jax.tree.map(lambda v: v[None], out)

    out_specs = P() if invariant else P("d")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=out_specs, check_vma=False))
    with stages.installed():
        compiled = fn.lower(data).compile()
    return compiled, stages.names


def _whole(kind: str, mesh: jax.sharding.Mesh, data: list[jax.Array]) -> Callable:
    """``psum`` or the untouched collective, as bench_jax.py times them."""
    def body(tree: list[jax.Array]) -> Any:
        local = [x[0] for x in tree]
        return jax.lax.psum(local, "d") if kind == "psum" else all_reduce(local, "d")

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P())).lower(data).compile()


def _bytes(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("bytes accessed", 0.0)) if cost else 0.0


def profile(name: str, shapes: list[tuple[int, ...]], mesh: jax.sharding.Mesh, rng: np.random.Generator) -> str:
    n = len(mesh.devices)
    data = [rng.standard_normal((n, *s)).astype(np.float32) for s in shapes]
    data = jax.device_put(data, NamedSharding(mesh, P("d")))
    _, names = _prefix(None, mesh, data)
    fns: dict[str, Any] = {"psum": _whole("psum", mesh, data), "adasum.jax.all_reduce": _whole("adasum", mesh, data)}
    fns["dispatch (a shard_map returning its input)"] = _prefix(0, mesh, data)[0]
    for k, stage in enumerate(names, 1):
        fns[stage] = _prefix(k, mesh, data, invariant=k == len(names))[0]
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(1 + ARGS.repeats):  # the first round warms up and is dropped
        for key, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(data))
            times[key].append(time.perf_counter() - start)
    med = {key: 1e3 * statistics.median(ts[1:]) for key, ts in times.items()}
    mb = {key: _bytes(fn) / 1e6 for key, fn in fns.items()}
    whole, psum = med["adasum.jax.all_reduce"], med["psum"]
    lines = [
        f"{name}: {sum(int(np.prod(s)) for s in shapes) * 4 / 1e6:.2f} MB per device; psum {psum:.2f} ms, "
        f"adasum {whole:.2f} ms ({whole / psum:.2f}x)",
        "| stage | ms | % of adasum | memory traffic MB (XLA) |",
        "| --- | ---: | ---: | ---: |",
    ]
    previous = ("", 0.0, 0.0)
    for key in ["dispatch (a shard_map returning its input)", *names]:
        lines.append(f"| {key} | {med[key] - previous[1]:.2f} | {100 * (med[key] - previous[1]) / whole:.0f} "
                     f"| {mb[key] - previous[2]:.1f} |")
        previous = (key, med[key], mb[key])
    lines.append(f"| {REST} | {whole - previous[1]:.2f} | {100 * (whole - previous[1]) / whole:.0f} "
                 f"| {mb['adasum.jax.all_reduce'] - previous[2]:.1f} |")
    lines.append(f"| **adasum.jax.all_reduce** | {whole:.2f} | 100 | {mb['adasum.jax.all_reduce']:.1f} |")
    lines.append(f"| **psum** | {psum:.2f} | {100 * psum / whole:.0f} | {mb['psum']:.1f} |")
    lines.append(_verdict(med, names, whole, psum))
    return "\n".join(lines)


def _verdict(med: dict[str, float], names: list[str], whole: float, psum: float) -> str:
    """One line: the time per kind of stage, largest first."""
    kinds: dict[str, float] = {}
    previous = med["dispatch (a shard_map returning its input)"]
    for key in names:
        kind = key.split(" ", 2)[-1].split(" (")[0] if key.startswith("exchange") else key
        kinds[kind] = kinds.get(kind, 0.0) + med[key] - previous
        previous = med[key]
    ranked = ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"=> {whole - psum:+.2f} ms over psum; by kind of stage: {ranked}"


def main() -> None:
    n = ARGS.devices
    mesh = jax.make_mesh((n,), ("d",), devices=jax.devices()[:n])
    rng = np.random.default_rng(0)
    if ARGS.quick:
        ARGS.repeats = 3
    print(
        f"jax {jax.__version__}, {n} host devices, {os.cpu_count()} CPU cores, "
        f"accumulation {accumulation_dtype()}, median of {ARGS.repeats} interleaved runs"
    )
    for name, shapes in (QUICK_CASES if ARGS.quick else CASES).items():
        print()
        print(profile(name, shapes, mesh, rng), flush=True)


if __name__ == "__main__":
    main()
