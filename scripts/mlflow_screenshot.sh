#!/usr/bin/env bash
# A PNG of an MLflow UI page, taken with headless Chromium (Debian package `chromium`).
#   scripts/mlflow_screenshot.sh OUT.png [URL]    (default URL: the MLflow UI of `make up`)
# The flags keep Chromium off the network (this machine has none) and out of ~/.config.
set -euo pipefail
out="$1"; url="${2:-http://127.0.0.1:${MLFLOW_PORT:-5000}/}"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${WINDOW:-1600,1000}" \
  --virtual-time-budget="${WAIT_MS:-20000}" --screenshot="$out" "$url" 2>/dev/null
echo "$out"
