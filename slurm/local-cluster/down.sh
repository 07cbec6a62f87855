#!/usr/bin/env bash
# Stop the local Slurm that up.sh started (its jobs are killed), and munge.
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null
timeout 10 scontrol shutdown 2>/dev/null  # asks slurmctld and every slurmd to stop
stop() {  # pattern: TERM, then KILL what is left after 5 s
    pkill -f "$1" 2>/dev/null || return 0
    for _ in $(seq 10); do pgrep -f "$1" >/dev/null || return 0; sleep 0.5; done
    pkill -9 -f "$1" 2>/dev/null
}
stop "^slurmd -N node"
stop "^slurmctld"
stop "^/usr/sbin/munged"
exit 0
