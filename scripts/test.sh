#!/usr/bin/env bash
# The README's test command: set up .venv (with the JAX, Lightning, Accelerate, TensorFlow/Keras and
# Triton extras, so their tests run too), then the linter and the type checker (configured in
# pyproject.toml), then the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ADASUM_EXTRAS="lab,jax,lightning,accelerate,tensorflow,triton,test" . scripts/setup.sh
python -c "import importlib.util as u; print('adasum C kernels:', 'built' if u.find_spec('adasum._kernels') else 'NOT built, using the PyTorch fallback')"
ruff check src tests benchmarks examples scripts
mypy
# The launcher tests (marked long: torchrun agents, Lightning's and Accelerate's launchers) take
# several minutes more: `bash scripts/test.sh -m long` runs them (a later -m replaces this one).
# --durations: the slowest tests, printed so that the run's time can be kept under 20 minutes.
python -m pytest -q -m "not long" --durations=20 "$@"
