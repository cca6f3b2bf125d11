#!/usr/bin/env bash
# local-cluster.sh: a one-node Slurm cluster on this machine, for trying the sbatch scripts and
# for the slurm tests. Everything it runs and writes lives under one folder; it never touches
# /etc/slurm or the system's munge daemon.
#
# Usage:
#   slurm/local-cluster.sh start    install (if missing) and start munged, slurmctld, slurmd;
#                                   wait until the node is idle; print where config and logs are
#   slurm/local-cluster.sh stop     cancel this cluster's jobs, stop the daemons it started
#                                   (by their pid files), remove pid files and the munge socket
#   slurm/local-cluster.sh status   say whether each daemon runs; show sinfo and squeue
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...`; use: eval "$(... env)"
#   slurm/local-cluster.sh purge    stop, then delete the whole folder (state, logs, key)
#
# All commands are idempotent: `start` on a running cluster only reports it, `stop` on a stopped
# one does nothing.
#
# Environment (all optional):
#   S2F_SLURM_DIR         folder for config, state, logs, pid files  [/tmp/s2f-slurm]
#   S2F_SLURMCTLD_PORT    slurmctld port                             [6817]
#   S2F_SLURMD_PORT       slurmd port                                [6818]
#   S2F_SLURM_PARTITION   partition name                             [debug]
#   S2F_SLURM_MEM_MARGIN  MiB of memory kept back from Slurm         [max(1024, 5% of RAM)]
#   S2F_SLURM_TIMEOUT     seconds to wait for the node to come up    [60]
#   S2F_SLURM_CRED_EXPIRE job credential lifetime, seconds; Slurm also holds a requeued job
#                         back this long before it may start again   [20] (Slurm's default: 120)
#
# Installing needs root (apt-get, Debian/Ubuntu packages slurmctld slurmd slurm-client munge);
# running slurmd needs root too, because it launches jobs as the submitting user.
#
# Clients (sbatch, srun, squeue, sinfo, scontrol, scancel) find this cluster through SLURM_CONF:
#   eval "$(slurm/local-cluster.sh env)"; sbatch slurm/train.sh configs/demo.yaml
set -euo pipefail

SLURM_DIR=${S2F_SLURM_DIR:-/tmp/s2f-slurm}
CTLD_PORT=${S2F_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${S2F_SLURMD_PORT:-6818}
PARTITION=${S2F_SLURM_PARTITION:-debug}
WAIT_S=${S2F_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${S2F_SLURM_CRED_EXPIRE:-20}

CONF=$SLURM_DIR/slurm.conf
LOG_DIR=$SLURM_DIR/log
RUN_DIR=$SLURM_DIR/run
MUNGE_DIR=$SLURM_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
PACKAGES=(slurmctld slurmd slurm-client munge)
# Daemon name -> the binary name /proc/<pid>/comm shows; checked before any kill so that a pid
# file left from an old run never makes us signal an unrelated process that reused the pid.
DAEMONS=(slurmd slurmctld munged)

die() {
  echo "local-cluster.sh: error: $*" >&2
  exit 1
}

log() {
  echo "local-cluster.sh: $*"
}

pid_file() {
  echo "$RUN_DIR/$1.pid"
}

# Prints the pid of daemon $1 if its pid file names a live process of that name.
live_pid() {
  local name=$1 file pid
  file=$(pid_file "$name")
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/comm ]] || return 1
  # comm is truncated to 15 characters and Debian's binaries are slurmctld-wlm / slurmd-wlm.
  [[ $(</proc/"$pid"/comm) == "$name"* ]] || return 1
  echo "$pid"
}

have_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v sbatch >/dev/null && command -v munged >/dev/null
}

install_packages() {
  have_packages && return 0
  [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing it needs root:
  sudo apt-get install -y ${PACKAGES[*]}"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get here;
  install slurmctld, slurmd, the Slurm clients and munge with this system's package manager"
  log "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # An image with empty package lists cannot install anything until they are fetched once.
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$LOG_DIR/apt.log" 2>&1; then
    apt-get update -q >>"$LOG_DIR/apt.log" 2>&1 || die "apt-get update failed; see $LOG_DIR/apt.log"
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$LOG_DIR/apt.log" 2>&1 ||
      die "apt-get install ${PACKAGES[*]} failed; see $LOG_DIR/apt.log"
  fi
  have_packages || die "packages installed but slurmctld/slurmd/sbatch/munged are still missing"
}

# Memory Slurm may hand out: slurmd drains a node whose configured RealMemory exceeds what it
# finds, so keep a margin below MemTotal.
real_memory_mb() {
  local total_mb margin
  total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  margin=${S2F_SLURM_MEM_MARGIN:-$((total_mb / 20 > 1024 ? total_mb / 20 : 1024))}
  ((total_mb > margin)) || die "only ${total_mb} MiB of memory, less than the ${margin} MiB margin"
  echo $((total_mb - margin))
}

# GPUs become a gres only when device files exist, so CPU-only machines need no gres.conf.
gpu_count() {
  local n=0 dev
  for dev in /dev/nvidia[0-9]*; do
    [[ -e $dev ]] && n=$((n + 1))
  done
  echo "$n"
}

write_config() {
  local node cpus mem gpus gres_line="" gres_types=""
  node=$(hostname -s)
  cpus=$(nproc)
  mem=$(real_memory_mb)
  gpus=$(gpu_count)
  if ((gpus > 0)); then
    gres_line="Gres=gpu:$gpus"
    gres_types="GresTypes=gpu"
    echo "Name=gpu File=/dev/nvidia[0-$((gpus - 1))]" >"$SLURM_DIR/gres.conf"
  else
    rm -f "$SLURM_DIR/gres.conf"
  fi
  cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a one-node cluster for trying s2f's sbatch scripts.
ClusterName=s2f-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# Our own munged on our own socket, so a system munge daemon (or none) does not matter.
# cred_expire also delays a requeued job's restart (120 s by default); one node launches fast.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$SLURM_DIR/state/slurmctld
SlurmdSpoolDir=$SLURM_DIR/state/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: containers rarely delegate them. linuxproc tracks a job's processes by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Without a database, ended jobs (and requeues) are recorded one line each in this file.
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt
MpiDefault=none
# No mail server here; the default mail program is missing and slurmctld complains about it.
MailProg=/bin/true
SchedulerType=sched/backfill
# Look at the queue every few seconds, so a requeued job starts soon after it becomes eligible.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Preemption/auto-requeue: 'scontrol requeue' from the training processes puts the job back.
JobRequeue=1
# Keep ended jobs visible to 'scontrol show job' for 10 minutes (there is no sacct here).
MinJobAge=600
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
$gres_types
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if live_pid munged >/dev/null; then
    return 0
  fi
  local key=$MUNGE_DIR/munge.key
  if [[ ! -s $key ]]; then
    mungekey --create --keyfile="$key" >/dev/null 2>&1 ||
      dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chmod 600 "$key"
  fi
  # munged refuses sockets in group/world-writable folders, hence its own 0755 folder.
  munged --force --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="$(pid_file munged)" \
    --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
    die "munged did not start; see $LOG_DIR/munged.log"
  munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null ||
    die "munged runs but does not answer on $MUNGE_SOCKET; see $LOG_DIR/munged.log"
}

start_daemon() {
  local name=$1
  if live_pid "$name" >/dev/null; then
    return 0
  fi
  "$name" -f "$CONF" || die "$name did not start; see $LOG_DIR/$name.log"
}

node_state() {
  SLURM_CONF=$CONF sinfo --noheader --nodes="$(hostname -s)" --format=%T 2>/dev/null | head -n1
}

wait_for_idle() {
  local deadline=$((SECONDS + WAIT_S)) state="" resumed=0
  while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case $state in
      idle | mixed | allocated | completing) return 0 ;;
      # A node left down/drained by an earlier run comes back on request.
      down* | drain* | fail*)
        if ((!resumed)); then
          SLURM_CONF=$CONF scontrol update nodename="$(hostname -s)" state=resume || true
          resumed=1
        fi
        ;;
    esac
    sleep 1
  done
  die "node state is '${state:-unknown}' after ${WAIT_S}s, not idle; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

cmd_start() {
  if live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null && live_pid munged >/dev/null; then
    log "already running"
    wait_for_idle
    print_where
    return 0
  fi
  mkdir -p "$LOG_DIR" "$RUN_DIR" "$SLURM_DIR/state/slurmctld" "$SLURM_DIR/state/slurmd"
  # munged wants its socket folder writable by its owner only; others need to reach the socket.
  mkdir -p "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"
  install_packages
  [[ $(id -u) -eq 0 ]] || die "slurmd must run as root to launch jobs; run this as root"
  write_config
  start_munge
  start_daemon slurmctld
  start_daemon slurmd
  wait_for_idle
  log "started"
  print_where
}

print_where() {
  cat <<EOF
  config:  $CONF
  logs:    $LOG_DIR/{slurmctld,slurmd,munged}.log, ended jobs in $LOG_DIR/jobcomp.txt
  clients: export SLURM_CONF=$CONF     (or: eval "\$(slurm/local-cluster.sh env)")
EOF
  SLURM_CONF=$CONF sinfo
}

cancel_jobs() {
  local ids
  ids=$(SLURM_CONF=$CONF squeue --noheader --format=%i 2>/dev/null || true)
  [[ -n $ids ]] || return 0
  log "cancelling jobs: ${ids//$'\n'/ }"
  # shellcheck disable=SC2086  # one id per word
  SLURM_CONF=$CONF scancel $ids || true
  local deadline=$((SECONDS + 40))
  while ((SECONDS < deadline)) && [[ -n $(SLURM_CONF=$CONF squeue --noheader 2>/dev/null) ]]; do
    sleep 1
  done
}

stop_daemon() {
  local name=$1 pid deadline
  if pid=$(live_pid "$name"); then
    kill -TERM "$pid"
    deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ($pid) ignored SIGTERM for 15 s; killing it"
      kill -KILL "$pid" || true
    fi
    log "stopped $name ($pid)"
  fi
  rm -f "$(pid_file "$name")"
}

cmd_stop() {
  if live_pid slurmctld >/dev/null && live_pid slurmd >/dev/null; then
    cancel_jobs
  fi
  local name
  for name in "${DAEMONS[@]}"; do
    stop_daemon "$name"
  done
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  log "stopped; logs kept in $LOG_DIR"
}

cmd_status() {
  local name pid running=0
  for name in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$name"); then
      echo "$name: running (pid $pid)"
      running=$((running + 1))
    else
      echo "$name: not running"
    fi
  done
  if ((running == ${#DAEMONS[@]})); then
    SLURM_CONF=$CONF sinfo
    SLURM_CONF=$CONF squeue
    return 0
  fi
  return 3
}

cmd_purge() {
  cmd_stop
  # Refuse to delete anything that does not look like our folder.
  [[ -f $CONF || ! -e $SLURM_DIR ]] || die "$SLURM_DIR has no slurm.conf; not deleting it"
  rm -rf "$SLURM_DIR"
  log "removed $SLURM_DIR"
}

main() {
  [[ $# -eq 1 ]] || die "usage: $0 start|stop|status|env|purge"
  case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    purge) cmd_purge ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$1'; usage: $0 start|stop|status|env|purge" ;;
  esac
}

main "$@"
