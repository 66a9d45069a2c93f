#!/usr/bin/env bash
# The critical-batch sweeps of the study's GPU-scale targets (docs/results/critical_batch.md):
# one-worker-equivalent runs of `adasum noise` at a constant rate, several rates per E, each
# run's history.csv and summary.json under OUT/NAME/E<E>-lr<LR>/. Resumable: a run whose
# summary.json exists is skipped, so a sweep cut off by a time limit goes on where it stopped.
#
#   scripts/critical-sweep.sh OUT [DEVICE] [PARALLEL]     # DEVICE: cuda (default) or cpu
#   SWEEPS="augdigits" scripts/critical-sweep.sh runs/critical-gpu cuda 8
#
# Three sweeps (SWEEPS, space-separated, default all; the first listed runs first):
# - augdigits: momentum on augdigits-resnet to 0.95, E = 64-16,384 (the CPU's two points fitted
#   B_crit about 290, S_min 91); the budget gives 128-1,024 steps, evaluations every 4-8 steps.
# - adam, lamb: one Adam / LAMB on the averaged gradient (--mode gradient) on teacher-mlp to
#   0.85, E = 1K-64K, 256-1,024 steps, evaluations every 4 steps (measured at 0.80 on the CPU:
#   B_crit 790 and 736; the sections' GPU scale takes 0.85, unmeasured until this sweep).
# - gauss-adam, gauss-lamb: the same on gauss-logistic to 0.895 (the CPU scale's target), rates
#   4x apart; augdigits-cpu: the CNN on the CPU scale's 8,192 samples to 0.80, E = 16-1,024.
#   Neither is in the default SWEEPS: CPU jobs, `SWEEPS=... scripts/critical-sweep.sh OUT cpu 1`.
# LRS (space-separated) replaces every E's rates: the widening of a grid whose best rate sat at
# an edge. POINTS (space-separated E:LR) keeps only those runs, and SEED (default 0) sets the
# seed of the model and the data order (its runs go to E<E>-lr<LR>-s<SEED>/): more seeds at the
# best points. THREADS: threads per run (default 2). Each run is stopped after RUN_TIMEOUT seconds
# (default 240) and then has no summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/critical-sweep.sh OUT [DEVICE] [PARALLEL]}"
DEVICE="${2:-cuda}"
PARALLEL="${3:-8}"
SWEEPS="${SWEEPS:-augdigits adam lamb}"
SEED="${SEED:-0}"
POINTS="${POINTS:-}"
RUN_TIMEOUT="${RUN_TIMEOUT:-240}"
THREADS="${THREADS:-2}"  # per run
PY="${PYTHON:-python}"

# One line per run: sweep E lr, then the arguments of `adasum noise` beyond the common ones.
runs() {
    local E lr spec S
    for sweep in $SWEEPS; do
        case $sweep in
        augdigits|augdigits-cpu)
            # E:epochs:evaluations per epoch: 65,536 augmented samples to 0.95 (the GPU scale), or
            # the CPU scale's 8,192 to 0.80.
            if [ "$sweep" = augdigits ]; then
                specs="16384:32:1 4096:16:4 1024:4:16 256:2:64 64:1:128" data="--target 0.95 --levels 0.9,0.97"
            else
                specs="1024:16:2 256:8:8 64:2:32 16:1:128" data="--samples 8192 --target 0.8 --levels 0.7,0.85"
            fi
            for spec in $specs; do
                IFS=: read -r E epochs evals <<< "$spec"
                lrs="0.025 0.05 0.1 0.2 0.4"
                [ "$E" -ge 4096 ] && lrs="$lrs 0.8"
                lrs="${LRS:-$lrs}"
                for lr in $lrs; do
                    echo "$sweep $E $lr --task augdigits-resnet --optimizer momentum --epochs $epochs" \
                         "--evals-per-epoch $evals $data"
                done
            done ;;
        adam|lamb|gauss-adam|gauss-lamb)
            # E:steps:rates (a fresh stream: samples = E x steps, one epoch).
            case $sweep in
            adam) task="teacher-mlp 0.85 0.8,0.83,0.86"
                specs="65536:256:0.064,0.128,0.256 16384:256:0.032,0.064,0.128,0.256"
                specs="$specs 4096:512:0.016,0.032,0.064,0.128,0.256 1024:1024:0.008,0.016,0.032,0.064,0.128" ;;
            lamb) task="teacher-mlp 0.85 0.8,0.83,0.86"
                specs="65536:256:0.024,0.032,0.045,0.064 16384:256:0.024,0.032,0.045,0.064"
                specs="$specs 4096:512:0.016,0.032,0.045,0.064 1024:1024:0.008,0.016,0.032,0.045" ;;
            gauss-*) task="gauss-logistic 0.895 0.89,0.9" rates=0.004,0.016,0.064,0.256
                [ "$sweep" = gauss-adam ] && rates="$rates,1"
                specs="65536:128:$rates 16384:256:$rates 4096:512:$rates 1024:1024:$rates" ;;
            esac
            read -r task target levels <<< "$task"
            for spec in $specs; do
                IFS=: read -r E S lrs <<< "$spec"
                lrs="${LRS:-${lrs//,/ }}"
                for lr in $lrs; do
                    echo "$sweep $E $lr --task $task --optimizer ${sweep#gauss-} --mode gradient --samples $((E * S))" \
                         "--epochs 1 --evals-per-epoch $((S / 4)) --target $target --levels $levels"
                done
            done ;;
        *) echo "unknown sweep '$sweep' (augdigits, augdigits-cpu, adam, lamb, gauss-adam, gauss-lamb)" >&2; exit 2 ;;
        esac
    done
}

one() {  # sweep E lr args...: one run, skipped when its summary exists
    local sweep=$1 E=$2 lr=$3; shift 3
    local dir="$OUT/$sweep/E$E-lr$lr"
    [ "$SEED" = 0 ] || dir="$dir-s$SEED"
    [ -f "$dir/summary.json" ] && return 0
    mkdir -p "$dir"
    local t0=$SECONDS
    if OMP_NUM_THREADS="$THREADS" timeout "$RUN_TIMEOUT" "$PY" -m adasum.lab noise "$@" --lr "$lr" --batch "$E" --workers 8 \
            --seed "$SEED" --device "$DEVICE" --out "$dir" > "$dir/log.txt" 2>&1; then
        echo "$sweep E=$E lr=$lr: $(grep -m1 'steps to' "$dir/log.txt" || tail -1 "$dir/log.txt") [$((SECONDS - t0)) s]"
    else
        echo "$sweep E=$E lr=$lr: FAILED or stopped after $((SECONDS - t0)) s: $(tail -1 "$dir/log.txt")"
    fi
}
export -f one
export OUT DEVICE RUN_TIMEOUT PY SEED THREADS

selected() {  # the runs, less those POINTS leaves out
    runs | awk -v points=" $POINTS " 'points == "  " || index(points, " " $2 ":" $3 " ")'
}
runs > /dev/null || exit 2
echo "$(selected | wc -l) runs ($SWEEPS, seed $SEED) on $DEVICE, $PARALLEL at a time, into $OUT"
selected | xargs -P "$PARALLEL" -L 1 bash -c 'one "$@"' _
echo "done: $(find "$OUT" -name summary.json | wc -l) runs with a summary in $OUT"
