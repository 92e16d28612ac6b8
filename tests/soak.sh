#!/usr/bin/env bash
# Soak test of `sana serve` (tests/soak.py, standard-library Python): 3 minutes of warm-up, then MINUTES (default 3) of mixed
# client load against the embedded model, memory and descriptor sampling, then SIGTERM under load.
# Further arguments go to soak.py (e.g. `tests/soak.sh 10 --concurrency 8 --report soak.json`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p sana --quiet
python3 tests/soak.py --minutes "${1:-3}" --sigterm "${@:2}"
