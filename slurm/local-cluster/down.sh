#!/usr/bin/env bash
# Stop the local Slurm that up.sh started (jobs are killed), and munge.
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null
scontrol shutdown 2>/dev/null  # slurmctld and every slurmd
sleep 2
pkill -x slurmctld 2>/dev/null
pkill -f "slurmd -N node" 2>/dev/null
pkill -x munged 2>/dev/null
exit 0
