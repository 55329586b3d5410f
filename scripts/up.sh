#!/usr/bin/env bash
# Start the local orchestration stack: a Prefect server, the MLflow UI, the
# `ast-local` process work pool with every deployment of prefect.yaml, and one
# worker. Everything binds to 127.0.0.1; PID files and logs go to .run/, Prefect
# state to .prefect/ (so nothing lands in ~/.prefect). `scripts/down.sh` stops
# exactly these processes. Idempotent: a part that is already up is left alone.
#
# Environment: PREFECT_PORT (4200), MLFLOW_PORT (5000), AST_VENV_BIN (.venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
RUN="$REPO/.run"
BIN="${AST_VENV_BIN:-$REPO/.venv/bin}"   # the project's virtual environment
PY="$BIN/python"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
POOL=ast-local   # the work pool prefect.yaml deploys to

export PREFECT_HOME="$REPO/.prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export PREFECT_LOGGING_EXTRA_LOGGERS=ast_pipeline
export MLFLOW_TRACKING_URI="sqlite:///$REPO/mlruns.db"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$RUN" "$PREFECT_HOME"

# Job control: each background job gets its own process group (down.sh signals
# the group, reaching the server's and workers' children) and keeps SIGINT
# (a non-interactive shell would otherwise start background jobs ignoring it).
set -m

alive() {  # alive NAME MARKER: the PID file names a live process whose command line holds MARKER
  local f="$RUN/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null && ps -p "$pid" -o args= | grep -q -- "$2"
}

start() {  # start NAME MARKER COMMAND...: run COMMAND in the background, PID in .run/NAME.pid
  local name="$1" marker="$2"; shift 2
  if alive "$name" "$marker"; then
    echo "$name: already running (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  nohup "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
  echo "$name: started (pid $!, log .run/$name.log)"
}

http_ok() {
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" 2>/dev/null
}

wait_http() {  # wait_http NAME MARKER URL SECONDS: until URL answers, or fail if NAME died
  local name="$1" marker="$2" url="$3" deadline=$((SECONDS + $4))
  until http_ok "$url"; do
    if ! alive "$name" "$marker"; then
      echo "$name: exited during start-up; last lines of .run/$name.log:" >&2
      tail -n 20 "$RUN/$name.log" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$name: not answering at $url after $4 s (see .run/$name.log)" >&2
      return 1
    fi
    sleep 1
  done
}

refuse_foreign_port() {  # a port that answers but is not ours: another service, do not deploy to it
  if ! alive "$1" "$2" && http_ok "$3"; then
    echo "$1: $3 already answers but not from a process this script started; stop it or set a different port" >&2
    exit 1
  fi
}

refuse_foreign_port prefect-server "prefect server start" "$PREFECT_API_URL/health"
start prefect-server "prefect server start" \
  "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off
wait_http prefect-server "prefect server start" "$PREFECT_API_URL/health" 120
echo "prefect-server: healthy at $PREFECT_API_URL"

refuse_foreign_port mlflow "mlflow ui" "http://127.0.0.1:$MLFLOW_PORT/health"
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no background job runners (GenAI scoring) for a UI
start mlflow "mlflow ui" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  "$BIN/mlflow" ui --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1

"$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 \
  || "$BIN/prefect" --no-prompt work-pool create "$POOL" --type process
"$BIN/prefect" --no-prompt deploy --all
start worker "prefect worker start" \
  "$BIN/prefect" worker start --pool "$POOL" --limit 1 --name "$POOL-worker"

wait_http mlflow "mlflow ui" "http://127.0.0.1:$MLFLOW_PORT/health" 120 \
  || echo "mlflow: UI not answering yet; the Prefect side is up" >&2

cat >"$RUN/env" <<EOF
# source this file (. .run/env) to talk to the stack started by scripts/up.sh
export PATH="$BIN:\$PATH"
export PREFECT_HOME="$PREFECT_HOME"
export PREFECT_API_URL="$PREFECT_API_URL"
export MLFLOW_TRACKING_URI="$MLFLOW_TRACKING_URI"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
EOF

cat <<EOF

Prefect UI: http://127.0.0.1:$PREFECT_PORT    MLflow UI: http://127.0.0.1:$MLFLOW_PORT
Run a deployment:
  . .run/env && prefect deployment run 'ast-pipeline/smollm2-quick'
Stop everything: make down
EOF
