"""``hvd.util._executing_eagerly()``: the helper Horovod's TensorFlow module exposed (also as
``hvd._executing_eagerly``), which its tests and scripts written for it call."""

import tensorflow as tf


def _executing_eagerly() -> bool:
    """Whether TensorFlow runs eagerly here (not while a graph or tf.function is being built)."""
    return tf.executing_eagerly()
