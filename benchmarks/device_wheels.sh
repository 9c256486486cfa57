#!/usr/bin/env bash
# The wheels a bare GPU machine lacks, for Python 3.12 on x86_64 Linux, downloaded here (where PyPI
# is reachable) and carried to it with the repository (the device tool carries at most 64 MiB).
#
#   bash benchmarks/device_wheels.sh .device_wheels        # here: download + build, print the size
#   # there (no network):
#   pip install --no-index --no-deps --target /tmp/site .device_wheels/*.whl
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_check.sh
#
# What the GPU machine this project is lent already has: Python 3.12, torch 2.11 (CUDA 13),
# triton 3.6, transformers 5.17 (within our tested range, so not carried), safetensors, einops,
# numpy, PyYAML, tqdm, packaging. What it lacks and the package imports at start:
#   megatron-core 0.16.1   the engine (pure Python wheel per CPython version)
#   omegaconf 2.4.0        the config tree (2.4 needs only PyYAML; 2.3's antlr4 runtime is gone)
#   mamba-ssm 2.3.2.post1  its Triton kernels only, built here with its CUDA build skipped: the
#                          ladder's `triton` rung (compat/backends.py) loads just mamba_ssm.ops.triton
#   pytest (+ pluggy, iniconfig, pygments)   to run tests/gpu there
# Not carried: wandb (optional: offline runs keep metrics.jsonl), Transformer Engine and
# causal-conv1d (compiled against one CUDA/torch; the ladder goes on without them), matplotlib
# (the demo's plots only).
set -euo pipefail
OUT=${1:?usage: device_wheels.sh OUTDIR}
PY=${PY:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any)
$PY -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$OUT" \
    megatron-core==0.16.1 omegaconf==2.4.0 pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.20.0

# mamba-ssm publishes only an sdist (its CUDA wheels come from GitHub releases, per torch/CUDA).
# MAMBA_SKIP_CUDA_BUILD builds the pure-Python part: the Triton kernels, no selective_scan_cuda.
if ! ls "$OUT"/mamba_ssm-*.whl >/dev/null 2>&1; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  URL=$(curl -fsS https://pypi.org/simple/mamba-ssm/ \
        | grep -o 'https://[^"#]*mamba_ssm-2\.3\.2\.post1\.tar\.gz' | head -1)
  curl -fsSL -o "$WORK/mamba_ssm-2.3.2.post1.tar.gz" "$URL"
  # no build isolation: its setup.py imports torch (this machine's is enough to package Python files)
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $PY -m pip wheel -q --no-deps --no-build-isolation \
      -w "$OUT" "$WORK/mamba_ssm-2.3.2.post1.tar.gz"
fi

ls -l "$OUT"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
TOTAL=$(cat "$OUT"/*.whl | wc -c)
LIMIT=$((40 * 1024 * 1024))
echo "total: $TOTAL bytes ($(awk -v b="$TOTAL" 'BEGIN{printf "%.1f", b/1048576}') MiB; limit 40 MiB)"
if [ "$TOTAL" -ge "$LIMIT" ]; then
  echo "device_wheels: over 40 MiB: the device tool carries at most 64 MiB with the repository" >&2
  exit 1
fi
