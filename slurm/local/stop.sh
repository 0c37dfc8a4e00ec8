#!/usr/bin/env bash
# Stop the one-node SLURM cluster that start.sh started in DIR, by the PIDs in
# its pid files. Idempotent: nothing running is not an error.
#
# Jobs' processes go first: with slurmctld gone, slurmstepd ignores SIGTERM.
set -uo pipefail

DIR=${1:?usage: stop.sh DIR}
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)

alive() {  # a zombie (state Z, not yet reaped by PID 1) counts as gone
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat")" != Z ]
}

stop_pid_file() {
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if alive "$pid"; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$file"
}

if [ -f "$DIR/slurm.conf" ] && command -v scancel >/dev/null; then
  SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
fi
# The steps' processes, then their slurmstepd (they run from this spool directory).
for pid in $(pgrep -f "slurmstepd.*" 2>/dev/null); do
  if grep -qs "$DIR" "/proc/$pid/environ" "/proc/$pid/cmdline"; then
    pkill -9 -P "$pid" 2>/dev/null
    kill -9 "$pid" 2>/dev/null
  fi
done
stop_pid_file "$DIR/slurmd.pid"
stop_pid_file "$DIR/slurmctld.pid"
stop_pid_file "$DIR/munge/munged.pid"
echo "stop.sh: SLURM in $DIR is stopped" >&2
