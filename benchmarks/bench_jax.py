"""adasum.jax.all_reduce against jax.lax.psum on the same arrays, 8 host devices.

    python benchmarks/bench_jax.py [--repeats 15] [--devices 8]

Each case is one jitted shard_map over a mesh of host CPU devices: every device holds its own
float32 arrays and ends with the Adasum (or the sum) of all of them. The two operations run
interleaved, case by case, so that load from other processes hits both alike; the table gives
the median wall time of each and their ratio. CPU host devices share the machine's cores, so the
absolute times say little about a real cluster; the ratio is the cost of Adasum's extra
arithmetic (dot products, compensated sums, combinations) next to a plain allreduce.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from _jax_host import parse_host_args

ARGS = parse_host_args(__doc__.splitlines()[0])

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", ARGS.x64)

from adasum.jax import accumulation_dtype, all_reduce  # noqa: E402

#: name -> shapes of the leaves every device holds (float32)
CASES = {
    "1 x 2^16": [(1 << 16,)],
    "1 x 2^20": [(1 << 20,)],
    "1 x 2^22": [(1 << 22,)],
    "MLP, 6 leaves, 1.1M": [(784, 1024), (1024,), (1024, 256), (256,), (256, 10), (10,)],
}


def _reduction(kind: str, mesh) -> callable:
    def body(tree):
        local = jax.tree.map(lambda x: x[0], tree)  # this device's arrays
        if kind == "psum":
            return jax.lax.psum(local, "d")
        return all_reduce(local, "d")

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P()))


def _time(fn, data) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(data))
    return time.perf_counter() - start


def main() -> None:
    n = ARGS.devices
    mesh = jax.make_mesh((n,), ("d",), devices=jax.devices()[:n])
    rng = np.random.default_rng(0)
    fns = {kind: _reduction(kind, mesh) for kind in ("psum", "adasum")}
    print(
        f"jax {jax.__version__}, {n} host devices, {os.cpu_count()} CPU cores, "
        f"accumulation {accumulation_dtype()}, median of {ARGS.repeats} interleaved runs"
    )
    print(f"{'case':<22} {'MB/device':>9} {'psum ms':>9} {'adasum ms':>10} {'ratio':>6}")
    for name, shapes in CASES.items():
        data = [rng.standard_normal((n, *s)).astype(np.float32) for s in shapes]
        data = jax.device_put(data, NamedSharding(mesh, P("d")))
        for fn in fns.values():  # compile and warm up
            _time(fn, data)
        times = {kind: [] for kind in fns}
        for _ in range(ARGS.repeats):
            for kind, fn in fns.items():
                times[kind].append(_time(fn, data))
        psum_ms, adasum_ms = (1e3 * statistics.median(times[k]) for k in ("psum", "adasum"))
        megabytes = sum(int(np.prod(s)) for s in shapes) * 4 / 1e6
        print(
            f"{name:<22} {megabytes:>9.2f} {psum_ms:>9.2f} {adasum_ms:>10.2f} "
            f"{adasum_ms / psum_ms:>6.2f}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
