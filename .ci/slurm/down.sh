#!/usr/bin/env bash
# Stop the one-node Slurm cluster that .ci/slurm/up.sh started: cancel every job, then stop
# slurmd, slurmctld and munged by their pid files. State, spool and logs under
# $FLAG_SLURM_DIR stay for debugging (rm -rf it for a clean start). Idempotent.
set -euo pipefail

DIR="${FLAG_SLURM_DIR:-$HOME/.cache/flag/slurm}"
export SLURM_CONF="$DIR/etc/slurm.conf"
log() { echo "slurm down: $*" >&2; }
# A pid file's process is alive: it exists, is not a zombie (a daemon killed with -9 can stay
# one while pid 1 does not reap it) and is the daemon the file names (not a reused pid).
alive() {
  local pid st
  [ -s "$1" ] || return 1
  pid="$(cat "$1")"
  st="$(ps -o stat=,comm= -p "$pid" 2>/dev/null)" || return 1
  case "$st" in Z*) return 1 ;; esac
  [ "${st##* }" = "$(basename "$1" .pid)" ]
}

stop() { # name pidfile
  local name="$1" pidfile="$2" pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

if [ -f "$SLURM_CONF" ] && alive "$DIR/run/slurmctld.pid" && command -v squeue >/dev/null; then
  jobs="$(squeue -h -o %i 2>/dev/null || true)"
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
# Job steps of a slurmd killed mid-job can outlive it: report them, do not guess what to kill.
left="$(pgrep -x slurmstepd 2>/dev/null || true)"
[ -z "$left" ] || log "WARNING: slurmstepd still running (pids: $(echo $left)); jobs may be left over"
stop munged /run/munge/munged.pid
log "stopped (state and logs kept in $DIR)"
