#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the SLURM tests (run as root).
#
#   bash tests/slurm/local_cluster.sh start   # prints the SLURM_CONF to export
#   bash tests/slurm/local_cluster.sh stop
#
# State, spool, logs and slurm.conf live in $SLURM_TEST_DIR (default /tmp/dino_slurm). Needs the
# Debian packages slurm-wlm and munge. The node is "localhost" with the machine's CPUs; one
# partition "debug" without time limit.
set -euo pipefail
DIR=${SLURM_TEST_DIR:-/tmp/dino_slurm}
CONF=$DIR/slurm.conf

start() {
  mkdir -p "$DIR/state" "$DIR/spool"
  # munge: key, log and socket directories owned by the munge user, daemon run as that user.
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0700 /etc/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
  fi
  local cpus
  cpus=$(nproc)
  cat > "$CONF" <<CONF
ClusterName=dino_test
SlurmctldHost=localhost
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again; the preemption
# test requeues one, and nothing here needs long-lived credentials.
AuthInfo=cred_expire=15
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (defaults: 60 s main loop, 30 s backfill), so a requeued job
# restarts as soon as it may instead of up to a minute later.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=30
MinJobAge=600
NodeName=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  export SLURM_CONF=$CONF
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -f "$CONF"
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -f "$CONF"
  for _ in $(seq 1 30); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
      echo "SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  echo "the local SLURM cluster did not come up; logs in $DIR" >&2
  sinfo >&2 || true
  return 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
