#!/usr/bin/env bash
# Stop exactly what scripts/up.sh started, by the PID files in .run/: the worker
# first (it still reports to the server), then the MLflow UI, then the server.
# Each was started as its own process group, so the group is signalled: that
# reaches the server's and the UI's web processes and nothing else. A process
# worker starts each flow run in a new session of its own, so the worker's
# direct children that lead their own group (its running flow runs) are
# signalled too. SIGINT first (a Prefect worker shuts down cleanly on it; it
# ignores SIGTERM while a flow run is in progress), then SIGTERM, SIGKILL as a
# last resort.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="$(pwd)/.run"
GRACE_S="${GRACE_S:-20}"

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

any_alive() {  # any_alive PGID...: true while a process of any group is left
  local g
  for g in "$@"; do group_alive "$g" && return 0; done
  return 1
}

signal_groups() {  # signal_groups SIG PGID...
  local sig="$1" g
  shift
  for g in "$@"; do kill "-$sig" -- "-$g" 2>/dev/null; done
}

wait_groups() {  # wait_groups SECONDS PGID...: true once every group is gone
  local deadline=$((SECONDS + $1))
  shift
  while any_alive "$@"; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}

own_session_children() {  # children of PID that lead their own process group (a worker's flow runs)
  ps -eo pid=,ppid=,pgid= | awk -v p="$1" '$2 == p && $1 == $3 { print $1 }'
}

stop() {  # stop NAME MARKER
  local name="$1" marker="$2" f="$RUN/$1.pid" pid groups
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
  # shellcheck disable=SC2207
  groups=("$pid" $(own_session_children "$pid"))
  echo "$name: stopping (process group(s) ${groups[*]})"
  signal_groups INT "${groups[@]}"
  if ! wait_groups "$GRACE_S" "${groups[@]}"; then
    echo "$name: still running after SIGINT; SIGTERM" >&2
    signal_groups TERM "${groups[@]}"
    if ! wait_groups 10 "${groups[@]}"; then
      echo "$name: still running after SIGTERM; SIGKILL" >&2
      signal_groups KILL "${groups[@]}"
      wait_groups 5 "${groups[@]}" || echo "$name: process group(s) ${groups[*]} did not exit" >&2
    fi
  fi
  rm -f "$f"
}

stop worker "prefect worker start"
stop mlflow "mlflow ui"
stop prefect-server "prefect server start"
rm -f "$RUN/env"  # it pointed at the stack that is now gone
