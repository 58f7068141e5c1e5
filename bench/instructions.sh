#!/bin/sh
# Instructions executed per proxied request, by callgrind, on bench/micro.py: a count, not a
# time, so it is the same on every run and on a busy machine. Two runs (1000 and 3000 measured
# requests) are subtracted, which removes start-up and warm-up. About two minutes.
#   bench/instructions.sh                 # policies on
#   bench/instructions.sh --no-policies   # extra arguments go to bench/micro.py
set -eu
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install -y valgrind)" >&2; exit 2; }
py="$(python3 -c 'import sys; print(sys.executable)')"  # the binary itself, not a shim script
count() {
  n="$1"; shift
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" bench/micro.py \
    --requests "$n" --repeat 1 "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
a=$(count 1000 "$@")
b=$(count 3000 "$@")
[ -n "$a" ] && [ -n "$b" ] || { echo "valgrind run failed" >&2; exit 1; }
python3 -c "print(f'instructions per request: {($b - $a) / 2000:,.0f}')"
