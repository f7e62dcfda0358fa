#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (munged, slurmctld, slurmd) for tests/test_slurm.py.
#
#   apt-get install -y slurm-wlm munge        # Debian 12: Slurm 22.05; needs root
#   source <(bash tests/slurm/start_cluster.sh)   # prints `export SLURM_CONF=...`; sbatch, squeue ... then use it
#   bash tests/slurm/start_cluster.sh stop     # or `status`: exit 0 when all three daemons run
#
# Everything lives under $HF_MIM_SLURM_ROOT (default /tmp/hf_mim_slurm): config, state, logs, pid files.
# No cgroups (proctrack/linuxproc, task/none): it runs in a container. cred_expire=10: a requeued job
# waits that long before it starts again (default 120 s). Ports 6917/6918 (not Slurm's
# 6817/6818, so a real cluster on the machine is left alone). Idempotent: a running cluster is reused.
set -euo pipefail

ROOT=${HF_MIM_SLURM_ROOT:-/tmp/hf_mim_slurm}
CONF=$ROOT/slurm.conf

stop_daemon() {  # by the pid file the daemon wrote
    if running "$1"; then
        kill "$(cat "$ROOT/run/$1.pid")"
    fi
    rm -f "$ROOT/run/$1.pid"
}

running() {  # the daemon's pid file names a live process
    [[ -f $ROOT/run/$1.pid ]] && kill -0 "$(cat "$ROOT/run/$1.pid")" 2>/dev/null
}

if [[ ${1:-start} == status ]]; then  # exit 0 when the whole cluster is up
    running munged && running slurmctld && running slurmd
    exit
fi
if [[ ${1:-start} == stop ]]; then
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    exit 0
fi

for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y slurm-wlm munge" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "start_cluster.sh needs root (slurmd runs jobs as their users)" >&2; exit 1; }

mkdir -p "$ROOT"/{state,spool,log,run,munge}
HOST=$(hostname -s)
CPUS=$(nproc)
MEMORY_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

write_config() {
    cat > "$CONF" <<CONFIG
ClusterName=hfmim
SlurmctldHost=$HOST
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$ROOT/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFIG
}

start_munge() {
    running munged && return
    munged --force --socket="$ROOT/munge/munge.socket" --pid-file="$ROOT/run/munged.pid" \
        --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munged.seed" --key-file=/etc/munge/munge.key
}

start_slurm() {
    export SLURM_CONF=$CONF
    if ! running slurmctld; then
        slurmctld -c -f "$CONF"  # -c: a clean start, no jobs from an earlier run
    fi
    if ! running slurmd; then
        slurmd -f "$CONF"
    fi
    for _ in $(seq 60); do  # the node registers within a few seconds
        if sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; then
            echo "export SLURM_CONF=$CONF"
            return
        fi
        sleep 1
    done
    echo "The Slurm node did not come up; see $ROOT/log/slurmctld.log and slurmd.log" >&2
    exit 1
}

write_config
start_munge
start_slurm
