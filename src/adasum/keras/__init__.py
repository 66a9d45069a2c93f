r"""Adasum for Keras 3's ``model.fit`` across worker processes (TensorFlow and torch backends).

    from adasum.keras import DistributedOptimizer, broadcast_variables

    DistributedOptimizer(inner, mode="delta")     delta mode: every worker steps ``inner`` on its
                                                  own gradients; the weight changes are combined
    DistributedOptimizer(inner, mode="gradient")  gradient mode: the gradients are combined, then
                                                  ``inner`` steps (SGD, momentum)
    broadcast_variables(model.variables)          every worker starts from rank 0's weights (a
                                                  built model: zero variables is refused)

Each worker is one process of a torch.distributed group (``torchrun``, or
:func:`adasum.launch.spawn`), feeds ``model.fit`` its own share of the data, and ends every
update with the same bits in its trainable variables. The combination is the project's one
engine (:class:`adasum.Reducer`), reached through :mod:`adasum.tensorflow` on the TensorFlow
backend and directly on the torch backend.
"""

from adasum.keras._backend import broadcast_variables
from adasum.keras._optimizer import MODES, DistributedOptimizer

__all__ = ["DistributedOptimizer", "broadcast_variables", "MODES"]
