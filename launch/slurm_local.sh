#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the sweep tests (and for trying hydra/launcher=slurm locally).
#   launch/slurm_local.sh install   apt-get install slurm-wlm and munge (Debian; needs root)
#   launch/slurm_local.sh start     write the config, start munged, slurmctld and slurmd; wait until sbatch works
#   launch/slurm_local.sh stop      stop them
# Facts from ../shared/reference/facts.md: proctrack/linuxproc, task/none, no accounting, cons_tres, SlurmUser=root,
# state under /tmp, munged as the munge user after writing the key.
set -euo pipefail
STATE=/tmp/marker_lab_slurm
CONF=/etc/slurm/slurm.conf

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start() {
  mkdir -p "$STATE"/{state,spool} /etc/slurm /etc/munge /run/munge /var/log/munge /var/lib/munge
  host=$(hostname)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  cat > "$CONF" <<CONF
ClusterName=markerlab
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then echo "slurm: up ($host)"; return; fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm: did not come up; logs in $STATE" >&2
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  pkill -x munged || true
}

"${1:?usage: $0 install|start|stop}"
