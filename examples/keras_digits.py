"""Keras 3 ``model.fit`` on scikit-learn's digits, 4 worker processes, Adasum against averaging.

    python examples/keras_digits.py                       # TensorFlow backend
    python examples/keras_digits.py --backend torch       # torch backend
    python examples/keras_digits.py --workers 2 --epochs 4

Each worker is a process of one torch.distributed group (here started by
``adasum.launch.spawn``; ``torchrun`` does the same job for a script of your own). Every
worker builds the model, compiles it with ``adasum.keras.DistributedOptimizer`` around momentum
SGD (gradient mode: the gradients are combined, then every worker steps), takes rank 0's
weights with ``broadcast_variables`` and fits on its own quarter of the training set. The
learning rate is the one that suits a single worker: Adasum needs no rescaling for 4 workers,
while averaging takes 4 times smaller steps. The table has the columns ``adasum demo`` prints.
"""

import argparse
import os

import numpy as np

from adasum.launch import spawn

LR, BATCH, TARGET = 0.05, 32, 0.95
N_TEST = 297  # held out, the same on every worker
COLUMNS = ("reducer", "optimizer", "workers", "examples_per_step", "lr", "steps",
           "train_loss", "test_loss", "score", "steps_to_target", "epochs_to_target")


def digits():
    """The digits, shuffled once: 8x8 images scaled to [0, 1] as 64 floats, and labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order] / 16.0).astype("float32"), y[order]


def train(rank: int, workers: int, reducer_name: str, epochs: int) -> dict:
    """One worker's run; every worker returns the same summary."""
    import keras

    import adasum
    from adasum.keras import DistributedOptimizer, broadcast_variables

    x, y = digits()
    x_test, y_test = x[:N_TEST], y[:N_TEST]
    x_train, y_train = x[N_TEST + rank :: workers], y[N_TEST + rank :: workers]

    keras.utils.set_random_seed(rank)  # different starts, until the broadcast below
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    reducer = adasum.Adasum() if reducer_name == "adasum" else adasum.Average()
    optimizer = DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9), reducer, mode="gradient")
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    broadcast_variables(model.variables)

    scores = []  # (updates so far, test loss, test accuracy) after every epoch
    at_epoch_end = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: scores.append(
            (int(keras.ops.convert_to_numpy(optimizer.iterations)), *model.evaluate(x_test, y_test, verbose=0))
        )
    )
    history = model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[at_epoch_end])
    steps_per_epoch = scores[0][0]
    reached = next((s for s, _, accuracy in scores if accuracy >= TARGET), None)
    return {
        "reducer": reducer_name, "optimizer": "momentum", "workers": workers,
        "examples_per_step": workers * BATCH, "lr": LR, "steps": scores[-1][0],
        "train_loss": history.history["loss"][-1], "test_loss": scores[-1][1], "score": scores[-1][2],
        "steps_to_target": reached,
        "epochs_to_target": None if reached is None else reached / steps_per_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "torch"), default="tensorflow")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    env = {"KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3"}

    from adasum.lab.report import markdown_table

    rows = []
    for reducer in ("adasum", "average"):
        print(f"fitting digits on {args.workers} Keras workers ({args.backend}) with {reducer} ...")
        rows.append(spawn(train, args.workers, reducer, args.epochs, timeout=900, env=env)[0])
    print(markdown_table(rows, COLUMNS), end="")
    print(f"score: test accuracy; steps_to_target: the first epoch end at test accuracy >= {TARGET} (- = not reached)")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
