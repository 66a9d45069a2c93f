"""adasum.tensorflow.all_reduce against TensorFlow's own SUM all-reduce, on the same tensors.

TensorFlow's side is the collective ``MultiWorkerMirroredStrategy`` runs (ring all-reduce over
gRPC between the worker processes, all tensors in one call); Adasum's is
:func:`adasum.tensorflow.all_reduce` inside ``tf.function`` (DLPack into the PyTorch engine,
Gloo). Both run interleaved in the same worker processes on the same tensors, and the medians
and their ratio are printed, so the machine's noise hits both alike.

    python benchmarks/bench_tensorflow.py              # the README's table: 2 and 4 workers
    python benchmarks/bench_tensorflow.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _args import comma_list

from adasum.launch import free_port, spawn


def _worker(rank: int, world: int, ports: list[int], sizes: list[int], tensors: int, reps: int) -> list[tuple]:
    # The strategy reads its cluster from TF_CONFIG, before TensorFlow starts its server.
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": rank},
    })
    import tensorflow as tf
    import torch.distributed as dist

    from adasum.tensorflow import all_reduce

    ring = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=ring)
    context = tf.distribute.get_replica_context  # noqa: E731 (inside strategy.run: the replica's)

    @tf.function
    def tf_sum(*ts):
        return strategy.run(lambda *t: context().all_reduce(tf.distribute.ReduceOp.SUM, [tf.identity(x) for x in t]), args=ts)

    @tf.function
    def adasum(*ts):
        return all_reduce(list(ts))

    rows = []
    for size in sizes:
        with strategy.scope():
            ts = [tf.random.normal([size // tensors], seed=rank) for _ in range(tensors)]
        times = {"tf_sum": [], "adasum": []}
        for rep in range(reps + 1):  # the first call of each traces and warms up
            for name, fn in (("tf_sum", tf_sum), ("adasum", adasum)):
                dist.barrier()
                start = time.perf_counter()
                out = fn(*ts)
                _ = [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]
                if rep:
                    times[name].append(time.perf_counter() - start)
        rows.append((world, size, statistics.median(times["tf_sum"]), statistics.median(times["adasum"]),
                     min(a / b for a, b in zip(times["adasum"], times["tf_sum"])),
                     max(a / b for a, b in zip(times["adasum"], times["tf_sum"]))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=comma_list(int), default="2,4", metavar="N,...",
                        help="world sizes (default %(default)s)")
    parser.add_argument("--sizes", type=comma_list(int), default=f"{1 << 20},{1 << 23}", metavar="ELEMENTS,...",
                        help="float32 elements in all (default %(default)s)")
    parser.add_argument("--tensors", type=int, default=8, help="the elements split into this many tensors")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="2 workers, 2^16 elements, 3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.sizes, args.reps = [2], [1 << 16], 3
    print("| workers | float32 elements | TF ring SUM (ms) | adasum.tensorflow (ms) | ratio of medians | ratio range |")
    print("|---|---|---|---|---|---|")
    for world in args.workers:
        ports = [free_port() for _ in range(world)]
        env = {"TF_CPP_MIN_LOG_LEVEL": "3"}
        rows = spawn(_worker, world, ports, args.sizes, args.tensors, args.reps, timeout=1800, env=env)[0]
        for w, size, tf_ms, ada_ms, low, high in rows:
            print(f"| {w} | 2^{size.bit_length() - 1} | {tf_ms * 1e3:.1f} | {ada_ms * 1e3:.1f} | "
                  f"{ada_ms / tf_ms:.2f} | {low:.2f}-{high:.2f} |", flush=True)


if __name__ == "__main__":
    main()
