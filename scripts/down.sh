#!/usr/bin/env bash
# Stop exactly what scripts/up.sh started, by the PID files in .run/: the worker
# first (it still reports to the server), then the MLflow UI, then the server.
# Each was started as its own process group, so the group is signalled: that
# reaches the server's web process and a worker's running flow runs, and nothing
# else. SIGINT first (a Prefect worker shuts down cleanly on it; it ignores
# SIGTERM while a flow run is in progress), then SIGTERM, SIGKILL as a last resort.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="$(pwd)/.run"
GRACE_S="${GRACE_S:-20}"

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

wait_group() {  # wait_group PGID SECONDS: true once no process of the group is left
  local deadline=$((SECONDS + $2))
  while group_alive "$1"; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}

stop() {  # stop NAME MARKER
  local name="$1" marker="$2" f="$RUN/$1.pid" pid
  [ -f "$f" ] || { echo "$name: not running (no .run/$name.pid)"; return 0; }
  pid="$(cat "$f")"
  if ! group_alive "$pid"; then
    echo "$name: already stopped"
    rm -f "$f"
    return 0
  fi
  if kill -0 "$pid" 2>/dev/null && ! ps -p "$pid" -o args= | grep -q -- "$marker"; then
    echo "$name: pid $pid is no longer '$marker' (reused); leaving it alone" >&2
    rm -f "$f"
    return 0
  fi
  echo "$name: stopping (process group $pid)"
  kill -INT -- "-$pid" 2>/dev/null
  if ! wait_group "$pid" "$GRACE_S"; then
    echo "$name: still running after SIGINT; SIGTERM" >&2
    kill -TERM -- "-$pid" 2>/dev/null
    if ! wait_group "$pid" 10; then
      echo "$name: still running after SIGTERM; SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null
      wait_group "$pid" 5 || echo "$name: process group $pid did not exit" >&2
    fi
  fi
  rm -f "$f"
}

stop worker "prefect worker start"
stop mlflow "mlflow ui"
stop prefect-server "prefect server start"
