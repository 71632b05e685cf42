#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the Slurm tests (tests/slurm.rs) and for
# trying `rln-engine plan --submit` without a real cluster.
#
#   tools/slurm-local-cluster.sh start    install slurm-wlm + munge if missing (apt-get,
#                                         needs root), start munged, slurmctld, slurmd,
#                                         wait until the node is idle; reuses a running one
#   tools/slurm-local-cluster.sh stop     kill every daemon `start` started, by pid
#   tools/slurm-local-cluster.sh status   say whether it runs; exit 0 only if the node is up
#   tools/slurm-local-cluster.sh env      print `export SLURM_CONF=...` for a shell to eval
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives under
# $RLN_SLURM_DIR (default /tmp/rln-slurm-cluster); nothing under /etc is changed, so
# Slurm's client commands (sbatch, squeue, sinfo, scancel) find this cluster through
# SLURM_CONF=$RLN_SLURM_DIR/slurm.conf. The daemons run as root (SlurmUser=root) with
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no cgroups, no systemd,
# which is what lets it start inside containers and CI machines.
#
# Ports: $RLN_SLURM_CTLD_PORT (6817) and $RLN_SLURM_D_PORT (6818).
set -euo pipefail

DIR=${RLN_SLURM_DIR:-/tmp/rln-slurm-cluster}
CTLD_PORT=${RLN_SLURM_CTLD_PORT:-6817}
D_PORT=${RLN_SLURM_D_PORT:-6818}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
START_TIMEOUT_S=${RLN_SLURM_START_TIMEOUT_S:-90}

die() {
    echo "slurm-local-cluster: $*" >&2
    exit 1
}

# The pid in a pid file, if that process still runs and is the named daemon.
live_pid() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc 0-9 <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$name"* ]] || return 1
    echo "$pid"
}

node_state() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1
}

install_packages() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null &&
        command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed and this is not root: install them (apt-get install slurm-wlm munge) or run as root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get: install Slurm (slurmctld, slurmd, sbatch) and munge by hand"
    echo "slurm-local-cluster: installing slurm-wlm and munge (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >"${TMPDIR:-/tmp}/rln-slurm-apt.log" 2>&1; then
        tail -n 20 "${TMPDIR:-/tmp}/rln-slurm-apt.log" >&2
        die "could not install slurm-wlm and munge with apt-get (log: ${TMPDIR:-/tmp}/rln-slurm-apt.log)"
    fi
    command -v sbatch >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null ||
        die "apt-get installed slurm-wlm and munge but slurmd/sbatch/munged are still not on PATH"
}

write_config() {
    # The node as slurmd sees it (CPUs, sockets, cores, threads); memory a little below
    # the machine's so slurmd never finds less than configured and drains the node.
    local hw mem_mb
    hw=$(slurmd -C 2>/dev/null | head -n 1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
    [[ -n $hw ]] || hw="CPUs=$(nproc)"
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$CONF" <<EOF
# written by tools/slurm-local-cluster.sh: a single-node cluster on localhost
ClusterName=rlnlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
MaxArraySize=10001
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && live_pid "$DIR/slurmd.pid" slurmd >/dev/null &&
        [[ $(node_state) == idle* || $(node_state) == mix* || $(node_state) == alloc* ]]; then
        echo "slurm-local-cluster: already running (SLURM_CONF=$CONF)"
        return 0
    fi
    install_packages
    stop quiet
    rm -rf "$DIR"
    mkdir -p "$DIR"/{munge,state,spool,log}
    chmod 700 "$DIR" "$DIR/munge"

    # munge: a fresh key for this cluster; --force because the socket's folder lives
    # under /tmp (munged otherwise refuses a folder others could write above it)
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" ||
        die "munged did not start (log: $DIR/log/munged.log)"

    write_config
    slurmctld -f "$CONF" -c || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start (log: $DIR/log/slurmd.log)"

    local waited=0 state=""
    while ((waited < START_TIMEOUT_S)); do
        state=$(node_state || true)
        case $state in
        idle*) break ;;
        down* | drain*) SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
        waited=$((waited + 1))
    done
    if [[ $state != idle* ]]; then
        echo "--- slurmctld.log" >&2
        tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
        echo "--- slurmd.log" >&2
        tail -n 20 "$DIR/log/slurmd.log" >&2 || true
        stop quiet
        die "node $NODE did not become idle within ${START_TIMEOUT_S}s (state: '${state:-no answer}')"
    fi
    echo "slurm-local-cluster: node $NODE idle after ${waited}s (SLURM_CONF=$CONF)"
}

# Kills the daemons start started (pid files under $DIR only), waits until they are gone.
stop() {
    local quiet=${1:-} name pidfile pid pids=()
    for name in slurmd slurmctld munged; do
        case $name in
        munged) pidfile=$DIR/munge/munged.pid ;;
        *) pidfile=$DIR/$name.pid ;;
        esac
        if pid=$(live_pid "$pidfile" "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            [[ -n $quiet ]] || echo "slurm-local-cluster: stopped $name (pid $pid)"
        fi
    done
    local waited=0
    for pid in "${pids[@]}"; do
        while [[ -d /proc/$pid ]] && ((waited < 100)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

status() {
    local state
    state=$(node_state || true)
    if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && [[ -n $state ]]; then
        echo "slurm-local-cluster: running, node $NODE $state (SLURM_CONF=$CONF)"
        return 0
    fi
    echo "slurm-local-cluster: not running"
    return 1
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
