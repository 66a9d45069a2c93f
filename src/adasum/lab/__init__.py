"""The lab: everything built on top of the Adasum library to find out what it buys.

* the ``adasum`` program (:mod:`adasum.lab.cli`): ``train`` (real data-parallel training on
  local Gloo workers or under torchrun), ``simulate``, ``study``, ``noise`` (the critical batch,
  :mod:`adasum.lab.critical`), ``bench`` and ``demo``;
* the simulator (:mod:`adasum.lab.simulate`, its trained state in :mod:`~adasum.lab.replicas`,
  its device and chunks of workers in :mod:`~adasum.lab.device`): N workers in one process, step
  for step what ``adasum train`` does, plus the distance of each reducer's update to sequential
  SGD, the workers' orthogonality, and elastic worker counts; ``simulate --geometry``
  (:mod:`~adasum.lab.geometry`): Adasum of vectors at a known angle;
* the study (:mod:`adasum.lab.study`): sections of the large-batch study as data
  (:mod:`~adasum.lab.sections`), run resumably until their plan (:mod:`~adasum.lab.study_plan`)
  is complete; the protocol that tunes them (:mod:`~adasum.lab.protocol`), the readings that
  judge the paper's claims (:mod:`~adasum.lab.readings`, with :mod:`~adasum.lab.bootstrap`),
  the tables and plots (:mod:`~adasum.lab.study_report`, :mod:`~adasum.lab.study_plots`);
* the experiments: tasks, models, optimizers and the run configuration they share
  (:mod:`~adasum.lab.tasks`, the registry of tasks over the interface of
  :mod:`~adasum.lab.task`: the array tasks in :mod:`~adasum.lab.arrays`, the transformer on
  source text in :mod:`~adasum.lab.text`,
  the CNN on augmented digits in :mod:`~adasum.lab.images` and the streams of generated
  examples in :mod:`~adasum.lab.synthetic`; :mod:`~adasum.lab.models`,
  :mod:`~adasum.lab.optimizers`, :mod:`~adasum.lab.config`, :mod:`~adasum.lab.train`), and
  what a run measures (:mod:`~adasum.lab.records`);
* the reports: tables (:mod:`adasum.lab.report`) and plots (:mod:`adasum.lab.plots`).

The lab lies outside the core: it uses the library only through its public API (the reducers,
``adasum.ddp`` and ``adasum.optim``), and the core never imports it. It needs the ``lab`` extra
(numpy, tqdm, scikit-learn, matplotlib), which ``pip install adasum`` leaves out; the core needs
torch only.

This module stays free of imports beyond the standard library, because the ``adasum`` command
(and ``python -m adasum.lab``) runs :func:`main` before it knows whether the extra is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["main", "LAB_MODULES", "MISSING_EXTRA"]

#: What the lab imports beyond torch and the core, by import name (scikit-learn is ``sklearn``).
LAB_MODULES = ("numpy", "tqdm", "sklearn", "matplotlib")
MISSING_EXTRA = ("adasum: the program needs the lab extra: from the repository's root, pip install -e '.[lab]' "
                 "(scripts/setup.sh installs it)")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``adasum`` command: one line on stderr and exit status 2 when the lab extra is not
    installed (rather than an ImportError traceback from deep inside a subcommand), otherwise
    :func:`adasum.lab.cli.main`."""
    if any(importlib.util.find_spec(name) is None for name in LAB_MODULES):
        print(MISSING_EXTRA, file=sys.stderr)
        return 2
    from adasum.lab.cli import main as run

    return run(argv)
