#!/usr/bin/env bash
# On a machine with one or more CUDA GPUs: set up a virtual environment with a CUDA build of
# torch, then run every GPU-relevant test (tests/test_cuda.py: the CUDA arithmetic, the fused
# Triton kernels and the chunked PyTorch ops, against the CPU kernels, their memory high-water
# mark, the simulator, the DDP hook's stream order, the hook and the optimizer on one NCCL rank,
# multi-rank NCCL when there are two GPUs or more; and
# tests/test_chunked.py and tests/test_triton.py, the same arithmetic on CPU) and the benchmark
# of the CUDA arithmetic (extra memory against half a buffer; two 2^26 float32 buffers combined
# against torch.add), then times the simulator with 64 workers on the GPU.
#
#   scripts/gpu-check.sh                # everything; the output also goes to gpu-check-PART.log
#   scripts/gpu-check.sh tests          # the tests only; `timings`: the two timings only
#   PYTHON=python3.11 scripts/gpu-check.sh
#
# The environment is .venv-gpu, apart from the CPU-only .venv of setup.sh. If the machine's
# Python already has a CUDA build of torch (a GPU image), the environment sees that Python's
# packages (a .pth file) and installs the project beside them without touching torch, and
# needs no network when the image has the test tools too (as the H200 image lent here did);
# otherwise it installs torch==2.13.0 from PyPI, whose Linux wheel is the CUDA build. It stops
# with a clear message if torch in the environment still cannot use a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-gpu
PART="${1:-all}"
case $PART in all|tests|timings) ;; *) echo "usage: scripts/gpu-check.sh [all|tests|timings]" >&2; exit 2 ;; esac
exec > >(tee "gpu-check-$PART.log") 2>&1

cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if [ ! -x "$VENV/bin/python" ]; then
    if cuda_torch "$PY"; then
        echo "using the CUDA build of torch that $PY already has"
        "$PY" -m venv "$VENV"
        # --system-site-packages would reach the base interpreter's packages only, not those of
        # a virtual environment that $PY may itself be (a GPU image's): a .pth file names $PY's.
        "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
            > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_image.pth"
    else
        "$PY" -m venv "$VENV"
    fi
fi
. "$VENV/bin/activate"
pip() { python -m pip --disable-pip-version-check "$@"; }
if ! python -c 'import torch' 2>/dev/null; then
    pip install --quiet torch==2.13.0
fi
# The tests' and the lab's tools, and Triton (the CUDA builds of torch bring it): only those
# missing, so that a GPU image that has them all needs no network.
missing=$(python - <<'EOF'
import importlib.util as u
need = {"pytest": "pytest", "pytest_timeout": "pytest-timeout", "numpy": "numpy", "tqdm": "tqdm",
        "sklearn": "scikit-learn", "matplotlib": "matplotlib", "triton": "triton"}
print(" ".join(package for module, package in need.items() if u.find_spec(module) is None))
EOF
)
[ -z "$missing" ] || pip install --quiet $missing
# The project, editable, with its C kernels; --no-deps: never let the project's requirement
# replace the torch chosen above. Where setuptools is already there, no build isolation (which
# downloads it); where that fails (a setuptools too old for pyproject.toml, no network), the
# kernels are built in place and src/ goes on the path.
if ! { python -c 'import setuptools' 2>/dev/null && pip install --quiet --no-deps --no-build-isolation -e .; } &&
   ! pip install --quiet --no-deps --retries 1 --timeout 10 -e .; then
    echo "the editable install failed: building the C kernels in place, src/ on PYTHONPATH"
    python setup.py --quiet build_ext --inplace || echo "the C kernels were not built either: the CPU comparison tests skip"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
EOF
if ! cuda_torch python; then
    echo "ERROR: torch in $VENV has no usable CUDA (CPU-only build, or no driver/GPU visible):" >&2
    echo "       nothing GPU-related can run. Remove $VENV and install a CUDA build of torch." >&2
    exit 1
fi
python -c "import importlib.util as u; print('adasum C kernels:', 'built' if u.find_spec('adasum._kernels') else 'NOT built: the CPU comparison tests skip')"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "one GPU: the multi-rank NCCL tests skip (NCCL refuses two ranks on one GPU)"
fi

if [ "$PART" != timings ]; then
    echo; echo "== tests =="
    python -m pytest -q -rs tests/test_cuda.py tests/test_chunked.py tests/test_triton.py
fi
[ "$PART" != tests ] || exit 0

echo; echo "== the CUDA arithmetic: extra memory and time against torch.add =="
python benchmarks/bench_memory.py --device cuda --memory-exponent 24 --time-exponent 26

echo; echo "== the simulator on CUDA: 64 workers of the 3.3M-parameter transformer, seconds per step =="
python -m adasum.lab simulate --device cuda --task stdlib-transformer-large --workers 64 --batches 16 \
    --samples 8192 --epochs 1 --optimizers adam --reducers adasum,average --lrs 0.003 --no-distances \
    --out runs/gpu-check/simulate
