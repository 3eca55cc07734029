#!/usr/bin/env bash
# A real Slurm cluster on 127.0.0.1 for tests and trying job scripts: munged + slurmctld + one
# slurmd per fake node (Debian's Slurm is built with MULTIPLE_SLURMD).
#
#   bash slurm/local/cluster.sh up [--nodes 1|2]   # idempotent; a different --nodes restarts
#   bash slurm/local/cluster.sh status             # exit 0 when up and every node responds
#   bash slurm/local/cluster.sh down               # cancels jobs, stops daemons by PID
#   eval "$(bash slurm/local/cluster.sh env)"      # SLURM_CONF for sbatch/squeue/srun
#
# State (configs, PID files, logs, spool dirs) lives under $MEGATRON_EXT_SLURM_DIR
# (default /tmp/megatron-ext-slurm). Ports: $MEGATRON_EXT_SLURM_PORT (slurmctld, default 16817)
# and the next ones for the slurmd of each node. Needs root and Debian's slurmctld, slurmd,
# slurm-client, munge (libpmix2 for srun --mpi=pmix). Facts behind each setting:
# shared/notes/local-slurm.md.
set -euo pipefail

STATE=${MEGATRON_EXT_SLURM_DIR:-/tmp/megatron-ext-slurm}
PORT=${MEGATRON_EXT_SLURM_PORT:-16817}
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
HOST=$(hostname)

die() { echo "slurm/local/cluster.sh: $*" >&2; exit 1; }
log() { echo "slurm/local/cluster.sh: $*" >&2; }

need_binaries() {
  local b missing=()
  for b in munged mungekey slurmctld slurmd sinfo scontrol; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: apt-get install -y slurmctld slurmd slurm-client munge libpmix2"
  [ "$(id -u)" = 0 ] || die "run as root (slurmd starts job steps as their user)"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_names() { local n=$1 i; for ((i = 1; i <= n; i++)); do echo "node$i"; done; }

write_conf() {  # $1 = number of nodes
  local n=$1 i
  {
    echo "# Written by slurm/local/cluster.sh up --nodes $n; edits are overwritten."
    echo "ClusterName=megatronext"
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    # munge on our own socket, so a system munged (if any) is left alone.
    # cred_expire is also the wait before a requeued job restarts (default 120 s).
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10"
    # No systemd/cgroups here: track processes through /proc, no task containment or accounting.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$STATE/log/jobcomp.txt"
    # Count CPUs only; config_overrides lets a node declare more CPUs than the machine has.
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"
    echo "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    echo "KillWait=5"
    echo "MinJobAge=600"
    echo "SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmctldPidFile=$STATE/slurmctld.pid"
    echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
    echo "SlurmdPidFile=$STATE/slurmd-%n.pid"
    echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
    echo "SlurmdSpoolDir=$STATE/spool/slurmd-%n"
    # Per-node TmpFS: PMIx puts its rendezvous dirs there; shared, fake nodes collide.
    echo "TmpFS=$STATE/tmp/%n"
    for ((i = 1; i <= n; i++)); do
      echo "NodeName=node$i NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((PORT + i)) CPUs=8 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(node_names "$n" | paste -sd, -) Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

ensure_hosts() {  # fake node names must resolve (srun, MASTER_ADDR); a node named localhost fails
  local name missing=()
  for name in node1 node2; do
    getent hosts "$name" >/dev/null || missing+=("$name")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "127.0.0.1 ${missing[*]}  # megatron-ext slurm/local" >>/etc/hosts
  fi
}

start_munge() {
  if alive "$STATE/munge/munged.pid"; then return; fi
  # munged refuses a socket directory that is group/world-writable.
  install -d -m 0755 "$STATE/munge"
  [ -f "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key"
  chmod 0600 "$STATE/munge/munge.key"
  munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
}

wait_idle() {  # $1 = number of nodes; nodes come up in 0.1-1.6 s, allow 60 s on a busy machine
  local n=$1 t
  for ((t = 0; t < 120; t++)); do
    if [ "$(SLURM_CONF=$CONF sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l)" -ge "$n" ]; then
      return 0
    fi
    sleep 0.5
  done
  die "nodes not idle after 60 s; see $STATE/log/"
}

current_nodes() { [ -f "$STATE/nodes" ] && cat "$STATE/nodes" || echo 0; }

is_up() {
  local n i
  n=$(current_nodes)
  [ "$n" -gt 0 ] || return 1
  alive "$STATE/munge/munged.pid" && alive "$STATE/slurmctld.pid" || return 1
  for ((i = 1; i <= n; i++)); do alive "$STATE/slurmd-node$i.pid" || return 1; done
}

cmd_up() {
  local n=$1 i
  [[ "$n" =~ ^[12]$ ]] || die "--nodes must be 1 or 2 (got '$n')"
  need_binaries
  if is_up && [ "$(current_nodes)" = "$n" ]; then
    log "already up with $n node(s): $CONF"
    return 0
  fi
  cmd_down >/dev/null 2>&1 || true
  mkdir -p "$STATE/ctld" "$STATE/log" "$STATE/spool" "$STATE/tmp"
  for i in $(node_names "$n"); do mkdir -p "$STATE/spool/slurmd-$i" "$STATE/tmp/$i"; done
  ensure_hosts
  write_conf "$n"
  start_munge
  slurmctld -f "$CONF" -c  # -c: clear saved state (jobs of an earlier cluster)
  for i in $(node_names "$n"); do slurmd -f "$CONF" -N "$i"; done
  echo "$n" >"$STATE/nodes"
  wait_idle "$n"
  log "up with $n node(s); export SLURM_CONF=$CONF"
}

stop_pids() {  # pid files: TERM all, wait up to 10 s for all, then KILL what is left
  local f pids=() t pid left
  for f in "$@"; do
    [ -f "$f" ] && pids+=("$(cat "$f")")
  done
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 100; t++)); do
    left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$@"
}

cmd_down() {
  local t
  if alive "$STATE/slurmctld.pid"; then
    # Cancel jobs first so their steps (slurmstepd) end before the daemons do.
    SLURM_CONF=$CONF scancel --full --quiet --user=root 2>/dev/null || true
    for ((t = 0; t < 30; t++)); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  stop_pids "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"
  stop_pids "$STATE/munge/munged.pid"  # last: the others talk to it while shutting down
  rm -f "$STATE/nodes"
  log "down"
}

cmd_status() {
  if ! is_up; then echo "down"; return 1; fi
  echo "up: $(current_nodes) node(s), SLURM_CONF=$CONF"
  SLURM_CONF=$CONF sinfo -N -o "%N %T %c"
}

action=${1:-}
shift || true
nodes=1
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=${2:-}; shift 2 ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    *) die "unknown argument '$1' (usage: cluster.sh up|down|status|env [--nodes 1|2])" ;;
  esac
done
case $action in
  up) cmd_up "$nodes" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: cluster.sh up|down|status|env [--nodes 1|2]" ;;
esac
