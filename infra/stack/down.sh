#!/usr/bin/env bash
# make stack-down: stop what `make stack` started, by PID (worker first, then the servers).
# The worker ignores SIGTERM for a while; SIGINT stops it, so that goes first, then TERM, then KILL.
set -uo pipefail
cd "$(dirname "$0")/../.."
STACK=${LORAFLOW_STACK_DIR:-$PWD/.loraflow/stack}
for name in worker warm-pool webhook prefect-server s3; do
  pidfile=$STACK/pids/$name.pid
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    for signal in INT TERM KILL; do
      kill -"$signal" -- "-$pid" 2>/dev/null || kill -"$signal" "$pid" 2>/dev/null
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null || break
    done
    echo "  $name: stopped (pid $pid)"
  fi
  rm -f "$pidfile"
done
