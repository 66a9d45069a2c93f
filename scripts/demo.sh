#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then train digits on 4 worker processes
# with Adasum and with averaging, print the table and save the plot (runs/demo/curves.png).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
adasum demo "$@"
