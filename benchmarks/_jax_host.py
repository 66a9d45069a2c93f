"""The command line shared by the JAX benchmarks, which must set the number of host devices
before JAX is imported (XLA reads the flag once, at start-up)."""

from __future__ import annotations

import argparse
import os


def parse_host_args(description: str, *, quick: str | None = None) -> argparse.Namespace:
    """Parse --devices, --repeats and --x64 (and --quick, with help ``quick``, where given) and
    set XLA_FLAGS for that many host CPU devices. Call it before importing jax."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--devices", type=int, default=8, help="host CPU devices (default 8)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per case")
    parser.add_argument("--x64", action="store_true", help="enable x64 (float64 accumulation)")
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    return args
