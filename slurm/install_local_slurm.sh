#!/usr/bin/env bash
# A single-node Slurm (slurmctld + slurmd on localhost) for testing the SLURM scripts on one machine.
#   slurm/install_local_slurm.sh install   # apt-get install slurm-wlm munge, write /etc/slurm/slurm.conf
#   slurm/install_local_slurm.sh start     # start munged, slurmctld, slurmd (no systemd needed)
#   slurm/install_local_slurm.sh stop      # stop the three daemons by their PID files
#   slurm/install_local_slurm.sh status    # sinfo
# Needs root (or sudo) and a Debian/Ubuntu base. Measured on Debian 12: Slurm 22.05, install ~20 s.
# This is a test rig, not a cluster setup: one partition `debug`, no accounting, root as SlurmUser.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
CONF=/etc/slurm/slurm.conf
NODE=localhost

install() {
    if ! command -v slurmctld >/dev/null; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    local cpus memory_mb
    cpus=$(nproc)
    # Leave a fifth of the memory to the OS; slurmd refuses to start if RealMemory exceeds what it sees.
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    $SUDO mkdir -p /etc/slurm
    $SUDO tee "$CONF" >/dev/null <<CONF
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    echo "wrote $CONF ($cpus CPUs, $memory_mb MB)"
}

start() {
    $SUDO mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    $SUDO chown munge:munge /run/munge
    pgrep -x munged >/dev/null || $SUDO runuser -u munge -- /usr/sbin/munged
    # -N: the node is named localhost in slurm.conf whatever the machine's hostname is.
    [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null || $SUDO /usr/sbin/slurmctld
    [ -s /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null || $SUDO /usr/sbin/slurmd -N "$NODE"
    for _ in $(seq 30); do
        if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm did not come up; see /var/log/slurm/*.log" >&2
    return 1
}

stop() {
    for pid_file in /run/slurmd.pid /run/slurmctld.pid; do
        [ -s "$pid_file" ] && $SUDO kill "$(cat "$pid_file")" 2>/dev/null || true
    done
    [ -s /run/munge/munged.pid ] && $SUDO kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
