#!/usr/bin/env bash
# The abort at exit (docs/failures.md, "A finished job aborts at exit"), counted: SCRIPT runs
# RUNS times under torchrun on 3 ranks with adasum's exit hook and RUNS times with it removed
# after the script's own code, alternated; prints how many runs of each arm failed.
#
#   scripts/exit-race.sh 40 examples/horovod_adasum.py --use-adasum --steps 30
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:?usage: scripts/exit-race.sh RUNS SCRIPT [ARGS...]}"
SCRIPT="${2:?the script to run}"
shift 2
WRAP="$(mktemp --suffix=.py)"
trap 'rm -f "$WRAP"' EXIT
# The script runs as __main__ and its globals stay alive to the exit, as a script's do.
cat > "$WRAP" <<'PY'
import atexit, runpy, sys
arm, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, __import__("os").path.dirname(script))
kept = runpy.run_path(script, run_name="__main__")
if arm == "without":
    import adasum._exit
    atexit.unregister(adasum._exit._destroy_groups)
PY
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
TORCHRUN="${TORCHRUN:-.venv/bin/torchrun}"
with=0 without=0
for i in $(seq "$RUNS"); do
    "$TORCHRUN" --standalone --nproc-per-node=3 "$WRAP" without "$SCRIPT" "$@" > /dev/null 2>&1 || without=$((without + 1))
    "$TORCHRUN" --standalone --nproc-per-node=3 "$WRAP" with "$SCRIPT" "$@" > /dev/null 2>&1 || with=$((with + 1))
done
echo "failed runs of $RUNS: $without without the exit hook, $with with it ($SCRIPT $*)"
