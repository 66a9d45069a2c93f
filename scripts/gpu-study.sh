#!/usr/bin/env bash
# Sections of the study on a lent GPU, for a limited time: each named section runs
# `adasum study NAME --scale SCALE --device DEVICE --out docs/results/study/NAME-SCALE` in the
# background, all at once, and is stopped after SECONDS_LEFT seconds; the runs each finished
# (one JSON file per run, resumable) are packed into OUT/study-runs.tgz, which unpacks over the
# tree here. A later call (or a later lease) continues where this one stopped.
#
#   scripts/gpu-study.sh OUT SECONDS_LEFT SCALE NAME [NAME ...]
#   scripts/gpu-study.sh "$OUT" 420 cpu momentum elastic        # on the device machine
#   tar xzf /work/.device/N/study-runs.tgz                      # here, in the repository root
#
# DEVICE (default cuda) and PYTHON (default python3, with src/ on the path: a GPU image that
# has torch, numpy, tqdm, scikit-learn and matplotlib needs no install) may be set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu-study.sh OUT SECONDS_LEFT SCALE NAME [NAME ...]}"
LIMIT="${2:?seconds to run}"
SCALE="${3:?cpu or gpu}"
shift 3
[ $# -ge 1 ] || { echo "name at least one section" >&2; exit 2; }
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
before=$(find docs/results/study -name '*.json' -path '*/runs/*' 2>/dev/null | wc -l)
for name in "$@"; do
    # setsid: its own process group, so that the time limit stops the study and its workers.
    setsid timeout "$LIMIT" "${PYTHON:-python3}" -m adasum.lab study "$name" --scale "$SCALE" \
        --device "$DEVICE" --no-progress --out "docs/results/study/$name-$SCALE" > "$OUT/$name.log" 2>&1 &
done
wait
after=$(find docs/results/study -name '*.json' -path '*/runs/*' | wc -l)
echo "$((after - before)) new runs ($*; $SCALE scale on $DEVICE, $LIMIT s)"
tar czf "$OUT/study-runs.tgz" $(for name in "$@"; do echo "docs/results/study/$name-$SCALE"; done)
for name in "$@"; do echo "== $name"; tail -n 3 "$OUT/$name.log"; done
