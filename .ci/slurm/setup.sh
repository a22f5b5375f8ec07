#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster (munged + slurmctld + slurmd) on this host, for CI and local tests.
#
# Idempotent: installs Debian's slurm-wlm and munge only when missing, rewrites /etc/slurm/slurm.conf only when
# the rendered template changed (restarting the daemons then), starts only daemons that are not running, and
# returns once `sinfo` reports the node idle. Needs root; needs neither systemd nor cgroups.
#
# Environment:
#   SQUAD_DS_SLURM_DIR   state, spool, pid and log files       (default /var/tmp/squad-ds-slurm)
#   SQUAD_DS_SLURM_WAIT  seconds to wait for the node to idle  (default 90)
# Tear down with .ci/slurm/teardown.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${SQUAD_DS_SLURM_DIR:-/var/tmp/squad-ds-slurm}
wait_s=${SQUAD_DS_SLURM_WAIT:-90}
conf=/etc/slurm/slurm.conf
marker="# squad-ds CI: a one-node SLURM cluster"

log() { printf '[slurm-setup] %s\n' "$*"; }
die() { printf '[slurm-setup] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (daemons run as root; munged runs as user munge)"

# Is the daemon whose pid file is $1 running? The comm check guards against a stale pid file whose pid was reused
# (a CI machine that kept /var/tmp from an earlier session).
alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(basename "$1" .pid)" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating $key"
        mungekey --create --keyfile="$key" 2>/dev/null \
            || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge "$key"
    chmod 0700 /etc/munge
    chmod 0400 "$key"
    # Debian's package creates these through systemd-tmpfiles, which does not run without systemd.
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

render_conf() {
    local host addr cpus mem
    host=$(hostname -s)
    # The node talks to itself; 127.0.0.1 works whether or not the hostname resolves.
    addr=127.0.0.1
    cpus=$(nproc)
    # Modest and below the real size: slurmd drains a node whose RealMemory exceeds what it finds.
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 ))
    (( mem > 4096 )) && mem=4096
    sed -e "s|@HOST@|$host|g" -e "s|@ADDR@|$addr|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem|g" \
        -e "s|@DIR@|$dir|g" -e "s|@CTLD_PORT@|${SQUAD_DS_SLURMCTLD_PORT:-6817}|g" \
        -e "s|@SLURMD_PORT@|${SQUAD_DS_SLURMD_PORT:-6818}|g" "$here/slurm.conf.in"
}

stop_daemons() {
    local name
    for name in slurmd slurmctld; do
        if alive "$dir/run/$name.pid"; then
            log "stopping $name (config changed)"
            kill "$(cat "$dir/run/$name.pid")"
            for _ in $(seq 100); do alive "$dir/run/$name.pid" || break; sleep 0.1; done
        fi
    done
}

write_conf() {
    local new
    new=$(render_conf)
    if [[ -f $conf ]] && ! grep -qF "$marker" "$conf"; then
        die "$conf exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    if [[ -f $conf ]] && [[ $(cat "$conf") == "$new" ]]; then
        return
    fi
    stop_daemons
    log "writing $conf"
    install -d /etc/slurm
    printf '%s\n' "$new" > "$conf"
    # proctrack/linuxproc + task/none load no cgroup plugin, so no cgroup.conf is needed.
}

start_daemons() {
    install -d -m 0755 "$dir" "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
    if ! alive "$dir/run/slurmctld.pid"; then
        log "starting slurmctld"
        # -i: ignore state files from an older run with another config instead of refusing to start.
        slurmctld -i
    fi
    if ! alive "$dir/run/slurmd.pid"; then
        log "starting slurmd"
        slurmd_started=$(date +%s)
        slurmd
    fi
}

# slurmctld restores the node's last state from its state files, so "idle" alone can predate the new slurmd;
# the node is ready once the slurmd started above has registered (SlurmdStartTime) and the node is idle.
registered() {
    local since
    since=$(scontrol -o show node "$1" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2) || return 1
    [[ -n $since && $since != None ]] || return 1
    (( $(date -d "$since" +%s) >= slurmd_started - 1 ))
}

wait_idle() {
    local node state
    node=$(hostname -s)
    for _ in $(seq "$wait_s"); do
        registered "$node" || { sleep 1; continue; }
        state=$(sinfo -h -N -n "$node" -o '%T' 2>/dev/null || true)
        case $state in
            idle|mixed|allocated) log "node $node is $state"; return ;;
            drain*|down*)
                # A restarted slurmd can leave the node down/drained with a stale reason; ours is disposable.
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    sinfo -N -l || true
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    die "node $node not idle after ${wait_s}s"
}

started=$SECONDS
slurmd_started=0
install_packages
start_munge
write_conf
start_daemons
wait_idle
log "cluster up in $(( SECONDS - started ))s: $(sinfo -h -o '%P %a %D %T %N')"
log "logs: $dir/log; tear down with: bash $here/teardown.sh"
