#!/usr/bin/env bash
# The one GPU check (issue 9): CUDA-only tests, the tiny pipeline with TE + bf16 + recomputation,
# and a ~1B parent's elastic step times and peak memory; one JSON line on stdout. Without CUDA it
# says so and exits 0. Run from anywhere: bash benchmarks/gpu_check.sh [--skip-tests]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@" 2>/dev/null
