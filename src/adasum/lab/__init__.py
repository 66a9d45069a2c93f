"""The experiment side of the project: tasks, models, the real training loop of ``adasum
train`` and the shared run configuration. Only the programs (``adasum.cli``,
``adasum.simulate``) import this package; the library never does."""
