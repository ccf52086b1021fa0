#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and trying the SLURM launcher:
#
#   scripts/slurm_cluster.sh start     # munged, slurmctld and slurmd; waits for the node to be idle
#   scripts/slurm_cluster.sh status    # the daemons' pids and sinfo
#   scripts/slurm_cluster.sh stop      # ends the daemons (the folder stays, for their logs)
#   scripts/slurm_cluster.sh env       # the line to source so sbatch/squeue talk to it
#
# Everything lives in one folder the script owns, $DM_SLURM_DIR (default /tmp/dm_slurm):
# slurm.conf, the munge key and socket, spool and state directories, pid files and logs
# (log/{munged,slurmctld,slurmd}.log). The system's /etc/slurm and /etc/munge are never read or
# written: clients find the cluster through SLURM_CONF=$DM_SLURM_DIR/slurm.conf (printed by
# `env`). Every daemon is addressed on 127.0.0.1; the ports are $DM_SLURM_PORT (slurmctld,
# default 16817) and the one after it (slurmd). The node has $DM_SLURM_CPUS CPUs (default: this
# machine's) and 90% of its memory; no cgroups (proctrack/linuxproc, task/none), no accounting.
# Needs Debian's slurm-wlm and munge (scripts/setup.sh installs them) and root, or a user who
# may run the daemons. Idempotent: `start` on a running cluster only checks it; `stop` on a
# stopped one does nothing. Exit status 0 on success; 1 with the daemons' logs on failure.
set -euo pipefail

DIR=${DM_SLURM_DIR:-/tmp/dm_slurm}
PORT=${DM_SLURM_PORT:-16817}
CPUS=${DM_SLURM_CPUS:-$(nproc)}
START_TIMEOUT=${DM_SLURM_START_TIMEOUT:-60}
NODE=$(hostname -s)
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
DAEMONS=(slurmd slurmctld munged)

die() {
  echo "slurm_cluster: $*" >&2
  for log in "$DIR"/log/*.log; do
    [ -f "$log" ] || continue
    echo "--- last lines of $log:" >&2
    tail -n 25 "$log" >&2
  done
  exit 1
}

need_binaries() {
  local missing=()
  for bin in munged slurmctld slurmd sinfo sbatch squeue scancel scontrol; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "slurm_cluster: missing ${missing[*]}: apt-get install slurm-wlm munge" \
      "(or run scripts/setup.sh)" >&2
    exit 1
  fi
}

pid_of() {  # the running daemon's pid, or nothing
  local file="$DIR/run/$1.pid"
  [ -f "$file" ] || return 0
  local pid
  pid=$(cat "$file" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

write_config() {
  mkdir -p "$DIR"/{munge,run,log,spool,state}
  chmod 755 "$DIR" "$DIR"/{munge,run,log,spool,state}
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077 && dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none)
  fi
  chmod 400 "$DIR/munge/munge.key"
  local mem_mb
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  local user
  user=$(id -un)
  cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node test cluster; every daemon on 127.0.0.1.
ClusterName=dm_test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
# Short waits: tests finish in seconds, so tasks are started, ended and forgotten quickly.
SchedulerParameters=sched_interval=1,bf_interval=1
MessageTimeout=10
KillWait=5
MinJobAge=120
InactiveLimit=0
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
# For tests of jobs SLURM never starts: asking for more than 1 minute here pends forever.
PartitionName=short Nodes=$NODE MaxTime=1 State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true; }

start() {
  need_binaries
  if [ -n "$(pid_of slurmctld)" ] && [ -n "$(pid_of slurmd)" ] && [ -n "$(pid_of munged)" ]; then
    case "$(node_state)" in
      idle | mixed | allocated | completing)
        echo "slurm_cluster: already running ($DIR)"
        return 0
        ;;
    esac
  fi
  stop quiet
  rm -rf "$DIR/state" "$DIR/spool"  # a fresh cluster: no jobs recovered from an earlier one
  write_config
  : >"$DIR/log/munged.log"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" || die "munged did not start"
  for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
  [ -S "$DIR/munge/munge.socket" ] || die "munged did not create its socket"
  slurmctld -i || die "slurmctld did not start"
  slurmd -N "$NODE" || die "slurmd did not start"
  local deadline=$((SECONDS + START_TIMEOUT)) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated)
        echo "slurm_cluster: node $NODE $state ($DIR; export SLURM_CONF=$CONF)"
        return 0
        ;;
      down* | drain* | fail*)
        # a node seen down before (state saved) comes back once slurmd has registered
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    sleep 0.5
  done
  die "node $NODE is '${state:-unknown}', not idle, after ${START_TIMEOUT}s" \
    "($(scontrol show node "$NODE" 2>/dev/null | grep -o 'Reason=.*' || true))"
}

stop() {
  local quiet=${1:-}
  local stopped=()
  if [ -n "$(pid_of slurmctld)" ] && [ -f "$CONF" ]; then
    # Jobs first: their slurmstepd processes would outlive slurmd.
    squeue -h -o %i 2>/dev/null | xargs -r scancel >/dev/null 2>&1 || true
    for _ in $(seq 100); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
  for daemon in "${DAEMONS[@]}"; do
    local pid
    pid=$(pid_of "$daemon")
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$DIR/run/$daemon.pid"
    stopped+=("$daemon($pid)")
  done
  if [ -z "$quiet" ]; then
    if [ "${#stopped[@]}" -gt 0 ]; then
      echo "slurm_cluster: stopped ${stopped[*]}"
    else
      echo "slurm_cluster: not running"
    fi
  fi
}

status() {
  local down=0
  for daemon in munged slurmctld slurmd; do
    local pid
    pid=$(pid_of "$daemon")
    echo "$daemon: ${pid:-not running}"
    [ -n "$pid" ] || down=1
  done
  [ "$down" -eq 0 ] || return 1
  sinfo
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 start|stop|status|env   (folder: \$DM_SLURM_DIR, default /tmp/dm_slurm)" >&2
    exit 2
    ;;
esac
