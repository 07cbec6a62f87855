#!/usr/bin/env bash
# Bring up a real Slurm on this machine for development and CI: munge, slurmctld and two
# slurmd (node1, node2, both 127.0.0.1). Needs root (Debian/Ubuntu). Safe to run twice.
# Tear down with slurm/local-cluster/down.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
grep -qw node1 /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts

# munge: the key the daemons and clients authenticate with
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
munge -n >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged  # unless one already answers

# slurm.conf for this machine: each node offers all CPUs, at least 8 (the 16-rank rehearsal
# of tests/test_rehearsal.py runs 8 tasks per node, as on an 8-GPU node; fewer cores are
# oversubscribed), and half the memory
cpus=$(( $(nproc) > 8 ? $(nproc) : 8 ))
memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/node1 /var/spool/slurmd/node2 /var/log/slurm
conf=/etc/slurm/slurm.conf
rendered="$(sed -e "s/@HOST@/$(hostname -s)/" -e "s/@CPUS@/$cpus/" -e "s/@MEMORY@/$memory/" "$here/slurm.conf.in")"
if [ "$rendered" != "$(cat "$conf" 2>/dev/null)" ]; then
    printf '%s\n' "$rendered" > "$conf"
    # The daemons read node definitions only at start: restart those already running with the
    # new file. Running jobs go on (slurmstepd outlives slurmd; slurmctld reloads its state).
    for daemon in slurmctld:/run/slurmctld.pid slurmd:/run/slurmd-node1.pid slurmd:/run/slurmd-node2.pid; do
        pid=$(cat "${daemon#*:}" 2>/dev/null) || continue
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${daemon%%:*}" ] || continue  # not a stale pid file's
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    done
fi

timeout 5 scontrol ping 2>/dev/null | grep -q UP || slurmctld
for node in node1 node2; do
    pgrep -f "slurmd -N $node" >/dev/null || slurmd -N "$node"
done

# wait until both nodes take jobs (idle, or running others' jobs)
for _ in $(seq 60); do
    if [ "$(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)$')" = 2 ]; then
        sinfo -N
        exit 0
    fi
    scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "local Slurm did not come up; see /var/log/slurm/" >&2
sinfo -N >&2 || true
exit 1
