#!/usr/bin/env bash
# Stop what slurm_up.sh started, each daemon by the PID in its pid file (never by name).
for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
    [ -s "$f" ] || continue; p=$(cat "$f")
    if kill -0 "$p" 2>/dev/null; then
        kill "$p"; for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
done
