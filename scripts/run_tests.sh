#!/usr/bin/env bash
# Runs the test suite once per backend, each in its own process
# (KERAS_BACKEND is fixed per process). By default the backends run side by
# side (JOBS=3), each pytest with one thread and its own log in $LOG_DIR
# (one line per test, the 30 slowest tests at the end);
# the logs are printed one after the other at the end. JOBS=1 runs them
# one at a time with the output live. Extra arguments go to pytest, e.g.
# `bash scripts/run_tests.sh -m "not slow"`. Exits non-zero if any backend
# fails.
set -u
VENV=${VENV:-.venv}
BACKENDS=${BACKENDS:-"torch jax tensorflow"}
JOBS=${JOBS:-3}
LOG_DIR=${LOG_DIR:-test-logs}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
export JAX_PLATFORMS=cpu
if [ "$JOBS" -gt 1 ]; then
  # Side by side, the backends share the cores: one thread each.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
mkdir -p "$LOG_DIR"

# If the run is stopped from outside (a CI time limit), show where each
# backend was before dying: the logs are otherwise printed only at the end.
on_term() {
  trap - TERM INT
  for backend in $BACKENDS; do
    echo "=== KERAS_BACKEND=$backend, stopped; last lines of $LOG_DIR/$backend.log ==="
    tail -n 40 "$LOG_DIR/$backend.log" 2>/dev/null
  done
  kill $(jobs -p) 2>/dev/null
  exit 143
}
trap on_term TERM INT

run_backend() {  # backend -> writes $LOG_DIR/<backend>.{log,rc,seconds}
  local backend=$1 start rc
  start=$(date +%s)
  KERAS_BACKEND=$backend "$VENV/bin/python" -m pytest -v -rfE \
    --durations=30 "${@:2}"
  rc=$?
  echo "$rc" >"$LOG_DIR/$backend.rc"
  echo $(($(date +%s) - start)) >"$LOG_DIR/$backend.seconds"
  return $rc
}

start=$(date +%s)
running=0
for backend in $BACKENDS; do
  rm -f "$LOG_DIR/$backend.rc" "$LOG_DIR/$backend.seconds"
  if [ "$JOBS" -gt 1 ]; then
    echo "=== KERAS_BACKEND=$backend started, log: $LOG_DIR/$backend.log ==="
    run_backend "$backend" "$@" >"$LOG_DIR/$backend.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
      wait -n
      running=$((running - 1))
    fi
  else
    echo "=== KERAS_BACKEND=$backend ==="
    run_backend "$backend" "$@" 2>&1 | tee "$LOG_DIR/$backend.log"
  fi
done
wait

status=0
summary=""
for backend in $BACKENDS; do
  if [ "$JOBS" -gt 1 ]; then
    echo "=== KERAS_BACKEND=$backend ($LOG_DIR/$backend.log) ==="
    cat "$LOG_DIR/$backend.log"
  fi
  rc=$(cat "$LOG_DIR/$backend.rc" 2>/dev/null || echo "no exit status")
  seconds=$(cat "$LOG_DIR/$backend.seconds" 2>/dev/null || echo "?")
  summary="$summary\n$backend: exit $rc in ${seconds}s"
  [ "$rc" != 0 ] && status=1
done
printf "=== summary ===%b\nwall time: %ss (JOBS=%s)\n" "$summary" \
  $(($(date +%s) - start)) "$JOBS"
exit $status
