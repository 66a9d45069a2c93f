#!/usr/bin/env bash
# Creates .venv if needed and installs into it: torch==2.13.0 first (the CPU build the project
# is tested with; a looser requirement would pull a multi-GB CUDA build), then the project with
# the extras named in $ADASUM_EXTRAS (default: lab, what the program needs). Sourced by demo.sh
# and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
# torch==2.13.0 again on the same command line: an extra (lightning, accelerate) that ever wanted
# another torch would then fail the install instead of replacing the CPU build.
python -m pip install --quiet --disable-pip-version-check -e ".[${ADASUM_EXTRAS:-lab}]" torch==2.13.0
