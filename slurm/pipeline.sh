#!/usr/bin/env bash
# Submit the whole Nemotron Elastic run as chained SLURM jobs (each starts only once the one before
# it ended COMPLETED, exit 0: --dependency=afterok):
#
#   parent:     train          (or import-hf with --from-hf)          -> RUN/parent
#   importance: importance     (scores, depth ranking, sorted parent) -> RUN/importance
#   elastic:    elastic-train  (router + KD + the curriculum)         -> RUN/elastic
#   export:     export-hf      (every budget, Hugging Face format)    -> RUN/hf
#   [slice:     slice          (Megatron checkpoints, with --slice)   -> RUN/family]
#
#   slurm/pipeline.sh --out runs/family --config configs/nemotron_nano_12b_v2.yaml --nodes 8
#   slurm/pipeline.sh --out runs/fam --from-hf /models/NVIDIA-Nemotron-Nano-12B-v2 --nodes 8 \
#       --elastic-args "parallel.tensor=8" --sbatch-args "--partition=batch --account=proj"
#   slurm/pipeline.sh --dry-run --out runs/x     # print the sbatch commands only
#
# Every job is slurm/job.sbatch; a preempted or requeued job resumes from its newest checkpoint
# (slurm/README.md), and its dependents wait for it. A job that fails cancels the rest
# (--kill-on-invalid-dep=yes) instead of leaving them pending forever.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: slurm/pipeline.sh --out RUN_DIR [options] [overrides...]

options:
  --out DIR              run directory: DIR/{parent,importance,elastic,hf,logs}; required
  --config C             config YAML or preset for the parent (default: the embedded tiny model)
  --from-hf HF_DIR       start from a Hugging Face NemotronH parent: import-hf instead of train
  --budget B             budget to export (repeatable; default: the run's elastic.budgets)
  --slice                also cut Megatron checkpoints of every budget (RUN_DIR/family)
  --nodes N              nodes for train / importance / elastic-train (default 1; export: 1)
  --gpus-per-node G      torchrun workers per node (default: the job's GPUs, else 8)
  --train-args "A B"     extra overrides for one job: --train-args (train only), --importance-args,
  --importance-args ...  --elastic-args, --export-args (word-split; values with spaces belong
  --elastic-args ...     in the YAML)
  --export-args ...
  --sbatch-args "A B"    extra sbatch options for every job (partition, account, time, ...)
  --dry-run              print the sbatch commands and submit nothing
  -h, --help             this text

overrides: dotted key=value pairs for every config-taking job (train, importance, elastic-train).

environment: SBATCH (the sbatch executable), and job.sbatch's: CONTAINER_IMAGE, CONTAINER_MOUNTS,
REQUEUE, TORCHRUN, OMP_NUM_THREADS (sbatch passes the environment on to the jobs).
EOF
}

die() { echo "slurm/pipeline.sh: error: $*" >&2; echo "run 'slurm/pipeline.sh -h' for usage" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JOB_SBATCH="$HERE/job.sbatch"
out="" config="" from_hf="" do_slice=0 nodes=1 gpus="" dry_run=0
budgets=() train_args=() importance_args=() elastic_args=() export_args=() sbatch_args=() overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help)          usage; exit 0 ;;
        --dry-run)          dry_run=1; shift ;;
        --slice)            do_slice=1; shift ;;
        --out)              need_value "$@"; out=$2; shift 2 ;;
        --config)           need_value "$@"; config=$2; shift 2 ;;
        --from-hf)          need_value "$@"; from_hf=$2; shift 2 ;;
        --budget)           need_value "$@"; budgets+=(--budget "$2"); shift 2 ;;
        --nodes)            need_value "$@"; nodes=$2; shift 2 ;;
        --gpus-per-node)    need_value "$@"; gpus=$2; shift 2 ;;
        --train-args)       need_value "$@"; read -r -a train_args <<<"$2"; shift 2 ;;
        --importance-args)  need_value "$@"; read -r -a importance_args <<<"$2"; shift 2 ;;
        --elastic-args)     need_value "$@"; read -r -a elastic_args <<<"$2"; shift 2 ;;
        --export-args)      need_value "$@"; read -r -a export_args <<<"$2"; shift 2 ;;
        --sbatch-args)      need_value "$@"; read -r -a sbatch_args <<<"$2"; shift 2 ;;
        -*)                 die "unknown option '$1'" ;;
        *=*)                overrides+=("$1"); shift ;;
        *)                  die "'$1' is neither an option nor a dotted key=value override" ;;
    esac
done
[[ -n "$out" ]] || die "--out RUN_DIR is required"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ -z "$gpus" || "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"
[[ -z "$from_hf" || -f "$from_hf/config.json" ]] || die "--from-hf '$from_hf' has no config.json"
[[ -z "$config" || -e "$config" || "$config" != */* ]] || die "--config '$config' does not exist"
out=$(realpath -m "$out")                     # jobs run in the submit dir; absolute paths are unambiguous
logs="$out/logs"

SBATCH=${SBATCH:-sbatch}
exec 3>&1                                     # submit() runs in $(...): its dry-run print goes to fd 3
submit() {  # submit NAME DEPENDENCY NODES JOB ARGS... -> prints the job id
    local name=$1 dep=$2 n=$3; shift 3
    local cmd=("$SBATCH" --parsable --job-name="em-$name" --nodes="$n" --output="$logs/%x-%j.out"
               "${sbatch_args[@]}")
    [[ -n "$dep" ]] && cmd+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
    cmd+=("$JOB_SBATCH" "$@")
    if (( dry_run )); then
        printf '%q ' "${cmd[@]}" | sed 's/ $//' >&3; echo >&3
        echo "<$name>"                         # stands for the job id in the dependents' --dependency
        return
    fi
    local id
    id=$("${cmd[@]}") || die "sbatch failed for the $name job"
    echo "${id%%;*}"                           # --parsable: "id" or "id;cluster"
}

(( dry_run )) || mkdir -p "$logs"
[[ -n "$gpus" ]] && export GPUS_PER_NODE="$gpus"
cfg_arg=(); [[ -n "$config" ]] && cfg_arg=(--config "$config")

# 1. the parent
if [[ -n "$from_hf" ]]; then
    parent=$(submit import 1 "" import-hf "$(realpath "$from_hf")" --out "$out/parent" "${cfg_arg[@]}" \
             "${overrides[@]}")
    parent_cfg="$out/parent/config.yaml"
else
    parent=$(submit train "" "$nodes" train "${cfg_arg[@]}" "logging.out_dir=$out/parent" "${overrides[@]}" \
             "${train_args[@]}")
    parent_cfg="$out/parent/config.yaml"      # train writes the config it ran with there
fi
# 2. importance: scores, the depth ranking and the sorted parent (its config.yaml names them)
imp=$(submit importance "$parent" "$nodes" importance --config "$parent_cfg" "checkpoint.load=$out/parent" \
      "logging.out_dir=$out/importance" "${overrides[@]}" "${importance_args[@]}")
# 3. the elastic curriculum on the sorted parent
ela=$(submit elastic "$imp" "$nodes" elastic-train --config "$out/importance/sorted/config.yaml" \
      "checkpoint.load=$out/importance/sorted/checkpoints" "logging.out_dir=$out/elastic" \
      "${overrides[@]}" "${elastic_args[@]}")
# 4. every budget as a Hugging Face model (one process streams it: no TP needed for export)
exp=$(GPUS_PER_NODE=1 submit export "$ela" 1 export-hf --checkpoint "$out/elastic" --out "$out/hf" \
      "${budgets[@]}" parallel.tensor=1 parallel.pipeline=1 parallel.data=0 "${export_args[@]}")
jobs_line="parent=$parent importance=$imp elastic=$ela export=$exp"
if (( do_slice )); then
    sl=$(GPUS_PER_NODE=1 submit slice "$ela" 1 slice --checkpoint "$out/elastic" --out "$out/family" \
         "${budgets[@]}" parallel.tensor=1 parallel.pipeline=1 parallel.data=0)
    jobs_line="$jobs_line slice=$sl"
fi

(( dry_run )) || echo "$jobs_line" > "$out/pipeline.jobs"
echo "submitted: $jobs_line"
echo "logs: $logs   (squeue -u \$USER; a job's dependents wait for it, a failure cancels them)"
