#!/usr/bin/env bash
# Launch `elastic-megatron` under torchrun, on one node or as one node of several.
#
#   launch/torchrun.sh --nproc 4 -- train --config tiny parallel.tensor=2 parallel.pipeline=2
#   launch/torchrun.sh --nproc 8 --nnodes 2 --node-rank 0 --master-addr node01 -- train ...   # on node01
#   launch/torchrun.sh --nproc 8 --nnodes 2 --node-rank 1 --master-addr node01 -- train ...   # on node02
#   launch/torchrun.sh --dry-run --nproc 2 -- train parallel.tensor=2                         # print only
#
# One node and no --master-addr: `torchrun --standalone` (it picks a free port itself).
# Several nodes: static rendezvous on --master-addr:--master-port; run this once per node.
# Under SLURM use slurm/train.sbatch instead (c10d rendezvous, one srun task per node).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/torchrun.sh [options] -- <elastic-megatron args>

options:
  --nproc N          processes on this node (default: number of GPUs, or 1 without GPUs)
  --nnodes N         number of nodes (default 1)
  --node-rank R      rank of this node, 0..N-1 (required with --nnodes > 1)
  --master-addr A    host of node rank 0 (required with --nnodes > 1)
  --master-port P    rendezvous port on the master (default 29500)
  --dry-run          print the torchrun command and exit
  -h, --help         this text

Everything after `--` goes to `python -m elastic_megatron.cli`, e.g.
  launch/torchrun.sh --nproc 4 -- train parallel.tensor=2 parallel.pipeline=2 logging.out_dir=runs/tp2pp2

environment:
  TORCHRUN           torchrun executable (default: torchrun)
  OMP_NUM_THREADS    threads per rank (default 1 when unset)
EOF
}

die() { echo "launch/torchrun.sh: error: $*" >&2; echo "run 'launch/torchrun.sh -h' for usage" >&2; exit 2; }

# Default process count: one per visible GPU, else 1 (CPU: pass --nproc to get several gloo ranks).
default_nproc() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" && "$n" -gt 0 ]]; then   # set (even empty): it decides
        n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    fi
    echo $(( n > 0 ? n : 1 ))
}

nproc="" nnodes=1 node_rank="" master_addr="" master_port=29500 dry_run=0
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help)       usage; exit 0 ;;
        --dry-run)       dry_run=1; shift ;;
        --nproc)         need_value "$@"; nproc=$2; shift 2 ;;
        --nnodes)        need_value "$@"; nnodes=$2; shift 2 ;;
        --node-rank)     need_value "$@"; node_rank=$2; shift 2 ;;
        --master-addr)   need_value "$@"; master_addr=$2; shift 2 ;;
        --master-port)   need_value "$@"; master_port=$2; shift 2 ;;
        --nproc=*|--nnodes=*|--node-rank=*|--master-addr=*|--master-port=*)
                         set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --)              shift; break ;;
        -*)              die "unknown option '$1'" ;;
        *)               break ;;  # first positional: the elastic-megatron args start here
    esac
done

[[ $# -gt 0 ]] || die "no elastic-megatron arguments; e.g. '-- train parallel.tensor=2'"
nproc=${nproc:-$(default_nproc)}
is_int "$nproc" && (( nproc >= 1 )) || die "--nproc must be a positive integer, got '$nproc'"
is_int "$nnodes" && (( nnodes >= 1 )) || die "--nnodes must be a positive integer, got '$nnodes'"
is_int "$master_port" || die "--master-port must be an integer, got '$master_port'"

cmd=("${TORCHRUN:-torchrun}")
if (( nnodes == 1 )) && [[ -z "$master_addr" ]]; then
    cmd+=(--standalone)
else
    [[ -n "$master_addr" ]] || die "--nnodes $nnodes needs --master-addr (the host of node rank 0)"
    # Every node must say which one it is: a silent default of 0 on all nodes would hang.
    [[ -n "$node_rank" ]] || (( nnodes == 1 )) || die "--nnodes $nnodes needs --node-rank (0..$((nnodes - 1)))"
    node_rank=${node_rank:-0}
    is_int "$node_rank" && (( node_rank < nnodes )) \
        || die "--node-rank must be in 0..$((nnodes - 1)), got '$node_rank'"
    cmd+=(--nnodes="$nnodes" --node_rank="$node_rank" --master_addr="$master_addr" --master_port="$master_port")
fi
cmd+=(--nproc_per_node="$nproc" -m elastic_megatron.cli "$@")

# One thread per rank unless the caller chose otherwise: N ranks x all cores would oversubscribe
# the CPU (torchrun sets the same default for nproc > 1, with a warning banner).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# GPU clusters: hints, not defaults. Uncomment or export before calling.
# export NCCL_DEBUG=WARN                  # INFO to see the rings/trees NCCL picks
# export NCCL_SOCKET_IFNAME=ib0           # the interface for bootstrap traffic on multi-homed hosts
# export NCCL_IB_DISABLE=1                # no InfiniBand: fall back to TCP sockets
# export TORCH_DISTRIBUTED_DEBUG=DETAIL   # check that ranks call matching collectives (slow)
# export CUDA_DEVICE_MAX_CONNECTIONS=1    # what Megatron-LM's examples set for TP/SP comm overlap

printf 'OMP_NUM_THREADS=%s' "$OMP_NUM_THREADS"
printf ' %q' "${cmd[@]}"
printf '\n'
if (( dry_run )); then exit 0; fi
exec "${cmd[@]}"
