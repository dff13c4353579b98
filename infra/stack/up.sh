#!/usr/bin/env bash
# make stack: a local loraflow stack on 127.0.0.1, idempotent — run it again and it starts only what is down.
#   Prefect server (SQLite)  http://127.0.0.1:$LORAFLOW_PREFECT_PORT (4200)
#   S3 server (nanio)        http://127.0.0.1:$LORAFLOW_S3_PORT (9000), bucket $LORAFLOW_BUCKET (loraflow)
#   work pool `gpu` (process), blocks (AwsCredentials `loraflow-s3`, S3Bucket `loraflow-artifacts`), with
#   $LORAFLOW_ALERTS_URL the notification block `loraflow-alerts` and the alert automations (infra/automations/),
#   the deployments from infra/stack/prefect-local.yaml (prefect.yaml's three, on the CPU demo config), one worker,
#   and the warm pool its finetune runs start in (`loraflow warm-pool`, socket $LORAFLOW_STACK_DIR/warm.sock).
# Logs, PIDs, the S3 keys and the Prefect database live in $LORAFLOW_STACK_DIR (.loraflow/stack).
# make stack-down stops what this started, by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STACK=${LORAFLOW_STACK_DIR:-$ROOT/.loraflow/stack}
PREFECT_PORT=${LORAFLOW_PREFECT_PORT:-4200}
S3_PORT=${LORAFLOW_S3_PORT:-9000}
BUCKET=${LORAFLOW_BUCKET:-loraflow}
BIN=${LORAFLOW_BIN:-$ROOT/.venv/bin}
mkdir -p "$STACK/logs" "$STACK/pids" "$STACK/s3-data"
export PREFECT_HOME=$STACK/prefect-home
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export LORAFLOW_PROJECT_DIR=$ROOT

running() { [ -f "$STACK/pids/$1.pid" ] && kill -0 "$(cat "$STACK/pids/$1.pid")" 2>/dev/null; }

start() {  # start NAME COMMAND...: in the background, its own session, log and pid under $STACK
  local name=$1; shift
  if running "$name"; then echo "  $name: already running (pid $(cat "$STACK/pids/$name.pid"))"; return; fi
  setsid "$@" >>"$STACK/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STACK/pids/$name.pid"
  echo "  $name: started (pid $!, log $STACK/logs/$name.log)"
}

wait_for() {  # wait_for URL SECONDS: until the URL answers 2xx
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "error: $1 did not answer within $2 s" >&2; exit 1; }
    sleep 0.5
  done
}

wait_for_port() {  # wait_for_port PORT SECONDS: until something listens on 127.0.0.1:PORT
  local deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "error: nothing listens on 127.0.0.1:$1 after $2 s" >&2; exit 1; }
    sleep 0.5
  done
}

# S3 keys: from the environment, else generated once and kept (mode 600) beside the stack's state.
if [ ! -f "$STACK/s3.env" ]; then
  umask 077
  printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' \
    "${AWS_ACCESS_KEY_ID:-loraflow-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')}" \
    "${AWS_SECRET_ACCESS_KEY:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}" > "$STACK/s3.env"
fi
set -a; . "$STACK/s3.env"; set +a
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}

echo "loraflow stack in $STACK"
NANIO_ACCESS_KEY=$AWS_ACCESS_KEY_ID NANIO_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
  start s3 "$BIN/python" -m nanio serve --host 127.0.0.1 --port "$S3_PORT" --data-dir "$STACK/s3-data"
start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_for_port "$S3_PORT" 60
wait_for "$PREFECT_API_URL/health" 120

"$BIN/python" "$ROOT/infra/stack/provision.py" --bucket "$BUCKET"
"$BIN/prefect" work-pool inspect gpu >/dev/null 2>&1 || "$BIN/prefect" work-pool create gpu --type process >/dev/null
echo "  work pool gpu: ready"
(cd "$ROOT" && LORAFLOW_PYTHON=$BIN/python "$BIN/prefect" --no-prompt deploy --all --prefect-file infra/stack/prefect-local.yaml \
  >"$STACK/logs/deploy.log" 2>&1) \
  || { echo "error: prefect deploy --all failed; see $STACK/logs/deploy.log" >&2; exit 1; }
echo "  deployments: $(grep -c "Deployment '" "$STACK/logs/deploy.log" || true) from infra/stack/prefect-local.yaml"

# Zombie runs (heartbeats stopped: a dead box, a killed worker) are marked Crashed; created once.
"$BIN/prefect" automation ls 2>/dev/null | grep -q "Crash zombie flow runs" \
  || "$BIN/prefect" automation create --from-file "$ROOT/infra/automations/zombie-runs.yaml" >/dev/null
echo "  automation: Crash zombie flow runs"

# The dataset-upload webhook receiver (README "Dataset uploads"), for s3://$BUCKET/datasets/; its secret is
# generated once and kept beside the S3 keys; only the receiver's environment gets it.
WEBHOOK_PORT=${LORAFLOW_WEBHOOK_PORT:-8787}
[ -f "$STACK/webhook.env" ] || (umask 077; printf 'LORAFLOW_WEBHOOK_SECRET=%s\n' \
  "${LORAFLOW_WEBHOOK_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}" > "$STACK/webhook.env")
LORAFLOW_WEBHOOK_SECRET=$(sed -n 's/^LORAFLOW_WEBHOOK_SECRET=//p' "$STACK/webhook.env") \
  start webhook env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
  LORAFLOW_WEBHOOK_ALLOWED="${LORAFLOW_WEBHOOK_ALLOWED:-$BUCKET/datasets/}" LORAFLOW_WEBHOOK_DB="$STACK/webhook.sqlite" \
  "$BIN/python" -m cli webhook serve --host 127.0.0.1 --port "$WEBHOOK_PORT"
wait_for "http://127.0.0.1:$WEBHOOK_PORT/health" 60

# The worker's flow runs read the store through the AwsCredentials block, not through keys in their env;
# they send a heartbeat every 60 s for the zombie automation. The worker asks for new runs every 2 s (Prefect's
# default is 10 s, on average 5 s between `prefect deployment run` and the run's process starting): one small
# query against the server each time.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
# The warm pool (loraflow/warm.py): one process that has imported torch and transformers (Unsloth on a GPU) waits
# for the next finetune run, whose command (python -m loraflow.warm_start) hands the run to it instead of paying
# that import again; the pool then starts the next one. Same environment as the worker, or runs start cold.
WARM_SOCKET=${LORAFLOW_WARM_SOCKET:-$STACK/warm.sock}
[ ${#WARM_SOCKET} -le 107 ] || WARM_SOCKET=/tmp/loraflow-warm-$(printf %s "$STACK" | cksum | cut -d' ' -f1).sock
export LORAFLOW_WARM_SOCKET=$WARM_SOCKET
start warm-pool env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY "$BIN/python" -m cli warm-pool
start worker env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY LORAFLOW_AWS_CREDENTIALS_BLOCK=loraflow-s3 \
  "$BIN/prefect" worker start --pool gpu --name "loraflow-$(hostname)"

cat <<INFO
ready:
  Prefect UI/API  http://127.0.0.1:$PREFECT_PORT   (export PREFECT_API_URL=$PREFECT_API_URL)
  S3 endpoint     $AWS_ENDPOINT_URL   bucket s3://$BUCKET   (keys in $STACK/s3.env)
  run one:        prefect deployment run finetune/manual --param config='{"train": {"max_steps": 5}}'
  uploads webhook http://127.0.0.1:$WEBHOOK_PORT/hooks/dataset-upload   (secret in $STACK/webhook.env)
  stop:           make stack-down
INFO
