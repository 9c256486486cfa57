#!/usr/bin/env bash
# A real single-node SLURM (munged + slurmctld + slurmd) on localhost, for the test suite.
# Idempotent: installs Debian's packages when missing, leaves running daemons alone.
# Needs root, Debian/Ubuntu (apt-get) and a machine without systemd managing the daemons.
# Recipe and traps: /work/shared/docs/slurm_localhost.md (no systemd: start by hand; /run/munge).
set -euo pipefail
PIDDIR=/run/slurm
export DEBIAN_FRONTEND=noninteractive

pkgs="slurmctld slurmd slurm-client munge"
need=0; for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || need=1; done
if [ $need = 1 ]; then
    apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
fi

[ -s /etc/munge/munge.key ] || mungekey --create --force
chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
for _ in $(seq 1 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null

H=$(hostname -s); CPUS=$(nproc)
C=$(slurmd -C)
SOCK=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$C")
CORES=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$C")
THR=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$C")
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 90 / 100 ))
if [ -d /sys/fs/cgroup/freezer ]; then PROCTRACK=proctrack/cgroup; else PROCTRACK=proctrack/linuxproc; fi
install -d -m 755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm $PIDDIR
cat > /etc/slurm/slurm.conf.new <<CONF
ClusterName=localci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=${PROCTRACK}
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# CI speed: a requeued job may start again after cred_expire (default 120 s), and jobs whose begin
# time passes wait for the next periodic scheduler pass (default 60 s)
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${PIDDIR}/slurmctld.pid
SlurmdPidFile=${PIDDIR}/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=30
MinJobAge=300
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUS} Sockets=${SOCK} CoresPerSocket=${CORES} ThreadsPerCore=${THR} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${H} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
if [ "$PROCTRACK" = proctrack/cgroup ]; then
    printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' \
        > /etc/slurm/cgroup.conf
fi

running $PIDDIR/slurmctld.pid || /usr/sbin/slurmctld
running $PIDDIR/slurmd.pid    || /usr/sbin/slurmd
st=""
for _ in $(seq 1 120); do
    st=$(sinfo -h -N -n "$H" -o %t 2>/dev/null || true); [ "$st" = idle ] && break; sleep 0.5
done
if [ "$st" != idle ]; then
    echo "node state '$st'" >&2; sinfo -R >&2 || true
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
