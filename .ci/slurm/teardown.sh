#!/usr/bin/env bash
# Stop the one-node cluster that .ci/slurm/setup.sh started: cancel jobs, stop slurmd, slurmctld and munged.
# Leaves the packages and /etc/slurm/slurm.conf in place so setup.sh can bring it back in seconds.
# SQUAD_DS_SLURM_PURGE=1 also removes the state/log directory (job state, logs).
set -euo pipefail

dir=${SQUAD_DS_SLURM_DIR:-/var/tmp/squad-ds-slurm}

log() { printf '[slurm-teardown] %s\n' "$*"; }

stop_pidfile() {
    local name=$1 file=$2 pid
    pid=$(cat "$file" 2>/dev/null) || return 0
    # Only a live process of that name: a stale pid file's pid may belong to something else by now.
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 0
    log "stopping $name ($pid)"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "$name did not stop after 10s; killing it"
    kill -9 "$pid" 2>/dev/null || true
}

# Cancel jobs first and let them end (KillWait is 10 s), so no job step outlives the daemons.
ctld_pid=$(cat "$dir/run/slurmctld.pid" 2>/dev/null || true)
if [[ -n $ctld_pid && $(cat "/proc/$ctld_pid/comm" 2>/dev/null) == slurmctld ]] && command -v scancel >/dev/null; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 1
    done
fi
stop_pidfile slurmd "$dir/run/slurmd.pid"
stop_pidfile slurmctld "$dir/run/slurmctld.pid"
stop_pidfile munged /run/munge/munged.pid
if [[ ${SQUAD_DS_SLURM_PURGE:-0} == 1 ]]; then
    log "removing $dir"
    rm -rf -- "$dir"
fi
log "done"
