#!/usr/bin/env bash
# Stop the servers .ci/s3/up.sh started (by the pids it recorded), SIGTERM then SIGKILL after
# FLAG_S3_STOP_WAIT_S (default 25 s; SeaweedFS 4.48 takes ~16 s to stop on SIGTERM because its
# filer waits out a 15 s gRPC graceful-stop timeout). Idempotent: a missing or stale pid file is just removed. `--wipe` also deletes the
# SeaweedFS data dir. Usage: down.sh [moto|seaweedfs|both] [--wipe]
set -euo pipefail

WHICH=both
WIPE=0
for a in "$@"; do
  case "$a" in
  moto | seaweedfs | both) WHICH="$a" ;;
  --wipe) WIPE=1 ;;
  *)
    echo "usage: $0 [moto|seaweedfs|both] [--wipe]" >&2
    exit 2
    ;;
  esac
done

FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
STATE="${FLAG_S3_DIR:-$FLAG_CACHE/s3}"
STOP_WAIT_S="${FLAG_S3_STOP_WAIT_S:-25}"

stop() {
  local name="$1" expect="$2" pidf="$STATE/$1.pid" pid
  if [ ! -f "$pidf" ]; then
    echo "s3 down: $name not running (no pid file)" >&2
    return 0
  fi
  pid="$(cat "$pidf")"
  # Only a process that is still the one we started (pid reuse): its command line names it.
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$expect"; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 $((STOP_WAIT_S * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "s3 down: $name (pid $pid) ignored SIGTERM for $STOP_WAIT_S s; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "s3 down: stopped $name (pid $pid)" >&2
  else
    echo "s3 down: $name pid $pid is not running (stale pid file)" >&2
  fi
  rm -f "$pidf"
}

case "$WHICH" in
moto) stop moto moto_server ;;
seaweedfs) stop seaweedfs weed ;;
both)
  stop moto moto_server
  stop seaweedfs weed
  ;;
esac

if [ "$WIPE" = 1 ] && [ "$WHICH" != moto ]; then
  rm -rf "$STATE/seaweedfs-data"
  echo "s3 down: wiped $STATE/seaweedfs-data" >&2
fi
