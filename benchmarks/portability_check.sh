#!/usr/bin/env bash
# The project on the other tested combination, the GPU machine's: Python 3.12 + torch 2.11 +
# transformers 5.17, with megatron-core / omegaconf / mamba-ssm / pytest from the carried wheels
# (benchmarks/device_wheels.sh) installed by `pip --target`, as on that machine; no wandb.
#   bash benchmarks/portability_check.sh [VENV]      # VENV default /tmp/v312 (made if missing)
# On CPU: a 3-step train, importance, a 2-step elastic-train, slice, and the HF round-trip tests.
# Not in CI (`make test`): PyPI's Linux torch 2.11 is the CUDA build, ~4.9 GB in the venv with its
# nvidia-* wheels (download.pytorch.org's CPU builds are not reachable from these machines), which
# is past what a 2-core CI job should download on every run. Results: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${1:-/tmp/v312}
PY312=${PY312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors einops numpy tqdm pyyaml
fi
WHEELS=${WHEELS:-$REPO/.device_wheels}
[ -n "$(ls "$WHEELS"/*.whl 2>/dev/null)" ] || bash benchmarks/device_wheels.sh "$WHEELS" >&2
SITE=$(mktemp -d)
RUN=$(mktemp -d)
trap 'rm -rf "$SITE" "$RUN"' EXIT
"$VENV/bin/pip" install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$REPO" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY="$VENV/bin/python"
"$PY" -c "import sys, torch, transformers, megatron.core, omegaconf; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', megatron.core.__version__, \
'omegaconf', omegaconf.__version__)"
"$PY" -c "import wandb" 2>/dev/null && echo "wandb is importable here (the GPU machine has none)" || echo "no wandb"
FAST=(train.eval_interval=0 logging.progress=false logging.wandb_mode=offline data.seq_length=32
      train.micro_batch_size=2 train.global_batch_size=2)
t0=$(date +%s)
"$PY" -m elastic_megatron.cli train "${FAST[@]}" train.steps=3 logging.out_dir="$RUN/p"
"$PY" -m elastic_megatron.cli importance "${FAST[@]}" elastic.importance_batches=2 checkpoint.load="$RUN/p" \
    logging.out_dir="$RUN/i"
"$PY" -m elastic_megatron.cli elastic-train --config "$RUN/i/sorted/config.yaml" \
    checkpoint.load="$RUN/i/sorted/checkpoints" "${FAST[@]}" "curriculum=[{name: s, steps: 2}]" logging.out_dir="$RUN/e"
"$PY" -m elastic_megatron.cli slice --checkpoint "$RUN/e" --out "$RUN/family"
echo "pipeline: $(( $(date +%s) - t0 )) s"
# deselected: torch 2.11's CUDA build on a CPU box logs "No CUDA runtime is found" on stderr at
# import, a second stderr line that test's one-line assertion (rightly) refuses
"$PY" -m pytest -q -p no:cacheprovider tests/unit/test_hf.py tests/unit/test_backends.py \
    tests/unit/test_optional_deps.py --deselect tests/unit/test_backends.py::test_a_forced_backend_through_the_cli_is_one_line
