"""``python -m adasum.lab``: the ``adasum`` command for launchers that take a module
(``torchrun --standalone --nproc-per-node=4 -m adasum.lab train ...``), with the same one-line
message when the lab extra is missing."""

import sys

from adasum.lab import main

sys.exit(main())
