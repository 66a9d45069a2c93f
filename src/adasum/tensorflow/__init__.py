r"""Adasum for TensorFlow: a collective across worker processes, eager and inside ``tf.function``.

    from adasum.tensorflow import all_reduce, broadcast

    all_reduce(tensors)          every worker's tensors replaced by their Adasum, per tensor
    all_reduce(tensors, reducer) the same with adasum.Average(), adasum.Sum(), adasum.Hierarchical
    broadcast(tensors, src=0)    rank src's tensors on every worker
    check(tensors)               all_reduce's validation alone (the same error on every worker);
                                 returns a value to make the updates of a graph depend on

The reduction is the project's one engine (:class:`adasum.Reducer` over torch.distributed), so
the semantics are those of the contract (rules 1-6): per tensor,

.. math::

    \mathrm{Adasum}(a, b) = \Bigl(1 - \frac{a\cdot b}{2\lVert a\rVert^2}\Bigr) a
                          + \Bigl(1 - \frac{a\cdot b}{2\lVert b\rVert^2}\Bigr) b ,

dot products and norms accumulated in float64, a zero vector leaving the other unchanged, the
order of :func:`adasum.schedule` for any number of workers, identical bits on every worker, and
one validation before any data moves (the same error on every worker). TensorFlow tensors cross
into PyTorch and back through DLPack without copies; see ``docs/tensorflow.md`` for why this
engine and not TensorFlow's own collective ops.

The workers form a torch.distributed process group before the first call, e.g. launched by
``torchrun --nproc-per-node 4 train.py`` with ``torch.distributed.init_process_group("gloo")``
at the top of ``train.py``. For Keras's ``model.fit`` see :mod:`adasum.keras`.
"""

from adasum.tensorflow._collective import all_reduce, broadcast, check

__all__ = ["all_reduce", "broadcast", "check"]
