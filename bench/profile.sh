#!/bin/sh
# Profile the sidecar under load: py-spy records it (200 Hz, max(10 s, --duration)) while wrk
# drives 64 keep-alive connections of 100-byte responses through it. The flame graph lands in
# bench/results/profile.svg; the short measured run before it goes to a temporary directory so
# bench/results/latest.json is left alone. Extra arguments go to bench/run.py.
set -eu
cd "$(dirname "$0")/.."
results="$(mktemp -d)"
python bench/run.py --only sidecar --conns 64 --sizes 100 --duration 3 --warmup 1 \
    --profile --profile-out bench/results/profile.svg --no-docs --results-dir "$results" "$@"
rm -rf "$results"
echo "flame graph: bench/results/profile.svg"
