#!/usr/bin/env bash
# The runnable rehearsal of a pod: `pdiff PDIFF_ARGS...` as N JAX processes on this machine
# (CPU, gloo collectives), joined through a coordinator on 127.0.0.1. Waits for all; if one
# fails the others are stopped and the exit code is non-zero.
#   usage: launch/multihost_local.sh N PDIFF_ARGS...     (--dry_run as first argument: print only)
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry_run" ]; then dry=1; shift; fi
n=${1:?usage: multihost_local.sh [--dry_run] N PDIFF_ARGS...}
shift
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
port=${PDIFF_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(env PDIFF_COORDINATOR=127.0.0.1:$port PDIFF_NUM_PROCESSES=$n PDIFF_PROCESS_ID=$i
       JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} "$py" -m pdiff_jax "$@")
  if [ $dry = 1 ]; then echo "${cmd[*]}"; continue; fi
  ( "${cmd[@]}" 2>&1 | sed -u "s/^/[process $i] /"; code=${PIPESTATUS[0]}
    [ "$code" = 0 ] || echo "multihost_local.sh: process $i exited with status $code" >&2
    exit "$code" ) &
  pids+=($!)
done
[ $dry = 1 ] && exit 0
status=0
for ((k = 0; k < n; k++)); do
  if ! wait -n; then
    status=1
    echo "multihost_local.sh: a process failed; stopping the others" >&2
    pkill -P $$ 2>/dev/null
    for p in "${pids[@]}"; do pkill -P "$p" 2>/dev/null; done
    break
  fi
done
wait 2>/dev/null
exit $status
