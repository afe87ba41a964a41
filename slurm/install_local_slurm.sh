#!/usr/bin/env bash
# A local Slurm (slurmctld + slurmd on this machine) for testing the SLURM scripts on one machine.
#   slurm/install_local_slurm.sh install [NODES]  # apt-get install slurm-wlm munge, write /etc/slurm/slurm.conf
#   slurm/install_local_slurm.sh start            # start munged, slurmctld and the slurmd(s) (no systemd needed)
#   slurm/install_local_slurm.sh stop             # stop the daemons by their PID files
#   slurm/install_local_slurm.sh status           # sinfo
# NODES (default 1) > 1 emulates that many nodes on this machine, for multi-node jobs: one slurmd per node
# (node1, node2, ...: own port, spool and PID file, all at 127.0.0.1), each offering all CPUs and 8 stand-in
# GPUs (character devices aliasing /dev/null, so `--gpus-per-node` requests are satisfiable). Node names do
# not resolve: multi-node jobs need `MASTER_ADDR=127.0.0.1` in the submitting environment (sbatch exports it).
# Needs root (or sudo) and a Debian/Ubuntu base. Measured on Debian 12: Slurm 22.05, install ~20 s.
# This is a test rig, not a cluster setup: one partition `debug`, no accounting, root as SlurmUser.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
CONF=/etc/slurm/slurm.conf
NODE=localhost

FAKE_GPUS=/run/slurm-fake-gpus
NODES_FILE=/etc/slurm/local_nodes

install() {
    local nodes=${1:-1}
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
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
CONF
    if [ "$nodes" -eq 1 ]; then
        $SUDO tee -a "$CONF" >/dev/null <<CONF
SlurmdSpoolDir=/var/spool/slurmd
SlurmdPidFile=/run/slurmd.pid
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
        echo "$NODE" | $SUDO tee "$NODES_FILE" >/dev/null
        echo "wrote $CONF ($cpus CPUs, $memory_mb MB)"
        return
    fi
    # %n: each emulated node's slurmd keeps its own spool, PID and log file. config_overrides: the nodes share
    # this machine's CPUs and memory, which each slurmd would otherwise refuse to offer a second time; each
    # offers at least 8 CPUs, so that the GPU scripts' default 8 tasks per node fit (`sbatch --test-only`).
    cpus=$((cpus > 8 ? cpus : 8))
    $SUDO tee -a "$CONF" >/dev/null <<CONF
SlurmdParameters=config_overrides
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
GresTypes=gpu
CONF
    local names=()
    for index in $(seq "$nodes"); do
        names+=("node$index")
        echo "NodeName=node$index NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((6817 + 2 * index))" \
            "CPUs=$cpus RealMemory=$memory_mb Gres=gpu:8 State=UNKNOWN" | $SUDO tee -a "$CONF" >/dev/null
    done
    local node_list
    node_list=$(IFS=,; echo "${names[*]}")
    echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP" | $SUDO tee -a "$CONF" >/dev/null
    echo "NodeName=$node_list Name=gpu File=$FAKE_GPUS/gpu[0-7]" | $SUDO tee /etc/slurm/gres.conf >/dev/null
    echo "${names[*]}" | $SUDO tee "$NODES_FILE" >/dev/null
    echo "wrote $CONF ($nodes emulated nodes: $node_list, $cpus CPUs and 8 stand-in GPUs each)"
}

start() {
    $SUDO mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    $SUDO chown munge:munge /run/munge
    pgrep -x munged >/dev/null || $SUDO runuser -u munge -- /usr/sbin/munged
    [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null || $SUDO /usr/sbin/slurmctld
    local nodes=("$NODE")
    [ -s "$NODES_FILE" ] && read -r -a nodes <"$NODES_FILE"
    if [ "${#nodes[@]}" -gt 1 ]; then
        $SUDO mkdir -p "$FAKE_GPUS"
        for index in $(seq 0 7); do
            [ -e "$FAKE_GPUS/gpu$index" ] || $SUDO mknod "$FAKE_GPUS/gpu$index" c 1 3
        done
    fi
    for node in "${nodes[@]}"; do
        local pid_file=/run/slurmd.pid
        [ "${#nodes[@]}" -gt 1 ] && pid_file=/run/slurmd-$node.pid && $SUDO mkdir -p "/var/spool/slurmd/$node"
        # -N: the node's name in slurm.conf, whatever the machine's hostname is.
        [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null || $SUDO /usr/sbin/slurmd -N "$node"
    done
    for _ in $(seq 30); do
        if [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cE '^(idle|mix|alloc)')" -eq "${#nodes[@]}" ]; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm did not come up; see /var/log/slurm/*.log" >&2
    return 1
}

stop() {
    local pid_file pid stopping=()
    for pid_file in /run/slurmd.pid /run/slurmd-*.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [ -s "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        $SUDO kill "$pid" 2>/dev/null && stopping+=("$pid")
    done
    # Wait until they have exited: `start` right after would otherwise see a dying daemon and not start it
    # (measured: munged still exiting when `start` looked, then gone, and no node could authenticate). A slurmd
    # whose munged is gone can hang in its shutdown: after 10 s it is killed.
    for pid in ${stopping[@]+"${stopping[@]}"}; do
        for _ in $(seq 100); do
            running "$pid" || break
            sleep 0.1
        done
        running "$pid" && $SUDO kill -9 "$pid" 2>/dev/null
    done
    return 0
}

# Whether process PID exists and is not a zombie (nothing here may reap the daemons once they exit).
running() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

case "${1:-}" in
    install) install "${2:-1}" ;;
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 install [NODES]|start|stop|status" >&2; exit 2 ;;
esac
