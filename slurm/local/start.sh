#!/usr/bin/env bash
# Start a one-node SLURM cluster in DIR, for tests and demos.
#
#   slurm/local/start.sh DIR       # then: eval "$(slurm/local/start.sh DIR)"  or  export SLURM_CONF=DIR/slurm.conf
#   slurm/local/stop.sh DIR
#
# A private munged (own key, own socket, in /tmp/qe-munge-*), slurmctld and slurmd for one node
# "localnode" with 16 CPUs and 4 fake GPUs (Gres=gpu:4; the device files are
# links to /dev/null). Idempotent: a cluster already running in DIR is left as
# it is. Installs the Debian packages if they are missing (as root). Waits
# until the node is idle, or fails saying why. Prints `export SLURM_CONF=...`
# on stdout; everything else goes to stderr. Facts behind each line:
# shared/notes/local-slurm.md.
set -euo pipefail

DIR=${1:?usage: start.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF="$DIR/slurm.conf"
# munged runs as user munge, which must reach its files: DIR may sit under a
# private directory (pytest's), so they live in /tmp, linked from DIR/munge.
MUNGE_DIR=/tmp/qe-munge-$(printf %s "$DIR" | sha1sum | cut -c1-12)
NODE=localnode
TIMEOUT=${QE_SLURM_START_TIMEOUT:-60}

say() { echo "start.sh: $*" >&2; }

alive() {  # a pid file whose process runs (a zombie, state Z, does not count)
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != Z ]
}

install_packages() {
  local missing=()
  for command in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${command%%:*}" >/dev/null || missing+=("${command##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "missing packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})"
    exit 1
  fi
  say "installing ${missing[*]} ..."
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then  # keep the packages from starting daemons of their own
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$DIR/apt.log" 2>&1 \
    || { apt-get update -q >>"$DIR/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >>"$DIR/apt.log" 2>&1; } \
    || { say "apt-get install failed; see $DIR/apt.log"; exit 1; }
  [ $created = 1 ] && rm -f "$policy"
  return 0
}

write_config() {
  mkdir -p "$DIR"/{state,spool,log,fakegpu} "$MUNGE_DIR"
  ln -sfn "$MUNGE_DIR" "$DIR/munge"
  for i in 0 1 2 3; do ln -sf /dev/null "$DIR/fakegpu/nvidia$i"; done
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$MUNGE_DIR"
  chmod 711 "$MUNGE_DIR"  # munged wants its socket directory reachable by all
  chmod 400 "$MUNGE_DIR/munge.key"
  cat > "$CONF" <<EOF
ClusterName=queue-engine-local
SlurmctldHost=localhost
SlurmctldPort=${QE_SLURMCTLD_PORT:-6817}
SlurmdPort=${QE_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=1,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
SlurmdParameters=config_overrides
GresTypes=gpu
MinJobAge=1800
KillWait=5
NodeName=$NODE NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=16 RealMemory=32000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/fakegpu/nvidia[0-3]
EOF
}

start_munged() {
  alive "$MUNGE_DIR/munged.pid" && return 0
  runuser -u munge -- munged --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  munge -n --socket="$MUNGE_DIR/munge.socket" | unmunge --socket="$MUNGE_DIR/munge.socket" >/dev/null \
    || { say "munged does not answer; see $MUNGE_DIR/munged.log"; exit 1; }
}

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
      idle|mixed|allocated) return 0 ;;
    esac
    sleep 0.2
  done
  say "node $NODE is not idle after ${TIMEOUT} s (state: '${state:-no answer}'); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
  exit 1
}

install_packages
if ! alive "$DIR/slurmctld.pid" || ! alive "$DIR/slurmd.pid"; then
  write_config
  start_munged
  alive "$DIR/slurmctld.pid" || slurmctld -c -i -f "$CONF"
  alive "$DIR/slurmd.pid" || slurmd -N "$NODE" -f "$CONF"
fi
wait_idle
say "SLURM is up in $DIR (node $NODE: 16 CPUs, 4 fake GPUs)"
echo "export SLURM_CONF=$CONF"
