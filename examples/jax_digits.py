"""Train a small MLP on scikit-learn's digits with Adasum on 8 JAX devices (host CPUs).

    python examples/jax_digits.py

Each of the 8 devices takes its own batch, runs its own Adam step, and the 8 parameter deltas
are reduced with Adasum (delta mode, the way the paper uses Adam). The parameters stay
identical on every device; the Adam moments stay per device.
"""

import os

# Eight CPU devices; this must happen before JAX is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import adasum.jax  # noqa: E402

DEVICES = 8
BATCH = 32  # per device: 256 examples before each communication
STEPS = 200
LEARNING_RATE = 3e-3

# --- data --------------------------------------------------------------------------------
x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)


# --- model -------------------------------------------------------------------------------
def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, 64)) / 8.0,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k2, (64, 10)) / 8.0,
        "b2": jnp.zeros(10),
    }


def logits(params, x):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


# --- the optimizer: Adam on each device, Adasum of the deltas ------------------------------
mesh = jax.make_mesh((DEVICES,), ("data",))
optimizer = adasum.jax.adasum_deltas(optax.adam(LEARNING_RATE), "data")
# For SGD-style training, reduce the gradients instead (gradient mode):
#   optimizer = optax.chain(adasum.jax.adasum_gradients("data"), optax.sgd(0.1))

params = init_params(jax.random.key(0))
# Adam's state differs between devices, so it carries a leading device axis, sharded.
per_device = NamedSharding(mesh, P("data"))
opt_state = jax.tree.map(
    lambda s: jnp.broadcast_to(s, (DEVICES, *jnp.shape(s))), optimizer.init(params)
)
opt_state = jax.device_put(opt_state, per_device)


@jax.jit
@jax.shard_map(
    mesh=mesh,
    in_specs=(P(), P("data"), P("data"), P("data")),
    out_specs=(P(), P("data"), P()),
)
def train_step(params, opt_state, xb, yb):
    state = jax.tree.map(lambda s: s[0], opt_state)  # this device's Adam state
    # Differentiate with respect to a device-varying view of the replicated parameters:
    # with respect to the replicated ones, JAX would already sum the gradients over devices.
    local = jax.lax.pcast(params, "data", to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(local, xb[0], yb[0])
    updates, state = optimizer.update(grads, state, params)  # Adasum of the Adam deltas
    params = optax.apply_updates(params, updates)  # identical on every device
    return params, jax.tree.map(lambda s: s[None], state), jax.lax.pmean(loss, "data")


# --- training ----------------------------------------------------------------------------
rng = np.random.default_rng(0)
for step in range(1, STEPS + 1):
    rows = rng.choice(len(y_train), size=(DEVICES, BATCH), replace=False)
    xb, yb = jax.device_put((x_train[rows], y_train[rows]), per_device)
    params, opt_state, loss = train_step(params, opt_state, xb, yb)
    if step % 25 == 0:
        accuracy = float((logits(params, x_test).argmax(-1) == y_test).mean())
        print(f"step {step:4d}  train loss {float(loss):.4f}  test accuracy {accuracy:.3f}")
