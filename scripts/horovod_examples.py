"""Run Horovod's Keras MNIST example against ``adasum.horovod.keras``, on data that ships.

    python scripts/horovod_examples.py HOROVOD [--nproc 2] [--epochs 24]

HOROVOD is a Horovod source checkout or sdist, as for horovod_conformance.py; nothing is
downloaded. ``examples/tensorflow2/tensorflow2_keras_mnist.py`` is copied into a temporary
directory (never into this repository: it is Horovod's, under its license), its imports are
rewritten as horovod_conformance.py rewrites the tests', and the edits below (each printed) are
made, so that it runs here; then it runs under ``torchrun`` and rank 0's output is printed,
followed by each epoch's (rank-averaged) training accuracy and loss.

The edits: MNIST (a download) becomes scikit-learn's 8x8 digits (1,797 images, scaled to
MNIST's 0-255 range, so the example's own division by 255 applies); ``compile``'s
``experimental_run_tf_function=False`` and a checkpoint named ``.h5`` are Keras 2 forms that
Keras 3 refuses (docs/horovod.md); ``--epochs`` shortens the run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from horovod_conformance import horovod_root, rewrite_imports

EXAMPLE = "examples/tensorflow2/tensorflow2_keras_mnist.py"

# Written here: MNIST's load_data() signature and layout, filled with scikit-learn's digits.
DIGITS_PY = '''\
"""MNIST's ((x_train, y_train), (x_test, y_test)) from scikit-learn's 8x8 digits, uint8 in
0-255 like MNIST's images; every image is in the training set (the example trains only)."""
import numpy as np
from sklearn.datasets import load_digits


def load_data(path=None):
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    return (images, labels), (images[:0], labels[:0])
'''

# (pattern, replacement, why); each must match once (a pattern's $ is a line's end).
EDITS = (
    (r"tf\.keras\.datasets\.mnist\.load_data\(.*\)$", "__import__('digits').load_data()",
     "MNIST (downloaded) -> scikit-learn's digits (shipped), through digits.py written here"),
    (r",\s*experimental_run_tf_function=False", "",
     "Keras 3's compile() has no experimental_run_tf_function"),
    (r"checkpoint-\{epoch\}\.h5", "checkpoint-{epoch}.keras",
     "Keras 3's ModelCheckpoint saves whole models as .keras only"),
)
EPOCHS = r"epochs=24"

# Keras 3 draws a progress bar (colours, redrawn lines); its last line in an epoch, after the
# callbacks, carries the epoch's logs: "250/250 ... accuracy: 0.98 - loss: 0.05 - lr: 0.002".
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PROGRESS = re.compile(r"^\s*(\d+)/(\d+) ")
LOGS = re.compile(r"accuracy: ([\d.]+) - loss: ([\d.]+)")


def epochs_of(output: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Rank 0's output without the progress bar's redrawn lines (each epoch's last kept), and
    each epoch's (accuracy, loss)."""
    lines: list[str] = []
    epochs: list[tuple[str, str]] = []
    last = None

    def bar_ends() -> None:  # a callback may print inside the bar: only a full bar ends the epoch
        lines.append(last)
        step = PROGRESS.match(last)
        if step and step[1] == step[2]:
            epochs.extend(LOGS.findall(last)[-1:])

    for line in re.split(r"[\r\n]+", ANSI.sub("", output)):
        if PROGRESS.match(line):
            last = line
            continue
        if last is not None:
            bar_ends()
            last = None
        lines.append(line)
    if last is not None:
        bar_ends()
    return lines, epochs


def stage(root: Path, work: Path, epochs: int | None) -> Path:
    """The example, rewritten, in work; prints each edit."""
    text = rewrite_imports((root / EXAMPLE).read_text())
    edits = [*EDITS, *([(EPOCHS, f"epochs={epochs}", f"--epochs {epochs}")] if epochs else [])]
    for pattern, replacement, why in edits:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise SystemExit(f"{EXAMPLE}: expected {pattern!r} once, found it {count} times (another Horovod version?)")
        print(f"edit: {why}")
    (work / "digits.py").write_text(DIGITS_PY)
    script = work / Path(EXAMPLE).name
    script.write_text(text)
    return script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("horovod", type=Path, help="a Horovod source checkout or sdist (.tar.gz)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default %(default)s)")
    parser.add_argument("--epochs", type=int, help="epochs instead of the example's 24")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the whole run")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with torch, TensorFlow and adasum")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hvd-example-") as scratch:
        work = Path(scratch)
        script = stage(horovod_root(args.horovod.resolve(), work, EXAMPLE), work, args.epochs)
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        command = [args.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   str(script)]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines, epochs = epochs_of(done.stdout)
    print("\n".join(lines))
    if done.returncode:
        print(done.stderr[-4000:], file=sys.stderr)
    for number, (accuracy, loss) in enumerate(epochs, 1):
        print(f"epoch {number}: accuracy {accuracy}, loss {loss}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
