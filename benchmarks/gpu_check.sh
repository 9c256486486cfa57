#!/usr/bin/env bash
# The one GPU check (issue 22), on any CUDA machine, bare ones included: one JSON line on stdout at
# the end, the result so far in $OUT/gpu_check.json (else /tmp/gpu_check.json) after every part.
# Without CUDA it says so and exits 0.
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--skip-tests]
# --wheels DIR: first install the carried wheels (benchmarks/device_wheels.sh, made where PyPI is
# reachable) with no network into /tmp/site, and run from there and this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  SITE=${SITE:-/tmp/site}
  ls "$WHEELS"/*.whl >/dev/null  # a missing or empty folder stops here, with ls's one line
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >&2
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
