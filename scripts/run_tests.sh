#!/usr/bin/env bash
# Runs the test suite once per backend (KERAS_BACKEND is fixed per process).
#
# Each backend's suite is cut in three parts, each its own pytest process:
# `integration` (tests/integration), `scripts` (tests/benchmarks and
# tests/examples) and `unit` (tests/unit). The nine parts go through a
# queue, JOBS at a time (default 3, side by side, one thread each), the
# longest first, so that no core idles while one backend's suite finishes
# alone. Each part writes its own log in $LOG_DIR (one line per test, the
# 30 slowest tests at the end) and a JUnit XML file with every test's time;
# the logs are printed one after the other at the end. JOBS=1 runs the
# parts one at a time with the output live.
#
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k merge`;
# with extra arguments each backend runs in one process (no parts), so that
# a path given here is not combined with the parts' own.
# Exits non-zero if any part fails.
set -u
VENV=${VENV:-.venv}
BACKENDS=${BACKENDS:-"torch jax tensorflow"}
JOBS=${JOBS:-3}
LOG_DIR=${LOG_DIR:-test-logs}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export JAX_PLATFORMS=cpu
if [ "$JOBS" -gt 1 ]; then
  # Side by side, the processes share the cores: one thread each.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
mkdir -p "$LOG_DIR"

# The queue: "backend:part" items, the longest first, by their seconds in
# a clean-clone run on 2 cores, three side by side: tensorflow integration
# 869, jax integration 783, tensorflow scripts 741, jax scripts 680, torch
# scripts 600, torch integration 488, jax unit 475, tensorflow unit 474,
# torch unit 192.
ORDER="tensorflow:integration jax:integration tensorflow:scripts
  jax:scripts torch:scripts torch:integration jax:unit tensorflow:unit
  torch:unit"
queue=()
if [ "$#" -eq 0 ]; then
  for item in $ORDER; do
    case " $BACKENDS " in *" ${item%%:*} "*) queue+=("$item") ;; esac
  done
else
  for backend in $BACKENDS; do queue+=("$backend:all"); done
fi

# If the run is stopped from outside (a CI time limit), show where each
# part was before dying: the logs are otherwise printed only at the end.
on_term() {
  trap - TERM INT
  for item in "${queue[@]}"; do
    echo "=== ${item/:/ }, stopped; last lines of $LOG_DIR/${item/:/-}.log ==="
    tail -n 40 "$LOG_DIR/${item/:/-}.log" 2>/dev/null
  done
  kill $(jobs -p) 2>/dev/null
  exit 143
}
trap on_term TERM INT

run_part() {  # backend part -> writes $LOG_DIR/<backend>-<part>.{log,rc,seconds}
  local backend=$1 part=$2 start rc name="$LOG_DIR/$1-$2" select=()
  case $part in  # the test folders of the part
    integration) select=(tests/integration) ;;
    scripts) select=(tests/benchmarks tests/examples) ;;
    unit) select=(tests/unit) ;;
  esac
  start=$(date +%s)
  KERAS_BACKEND=$backend "$VENV/bin/python" -m pytest -v -rfE \
    --durations=30 --junitxml="$name.xml" "${select[@]}" "${@:3}"
  rc=$?
  echo "$rc" >"$name.rc"
  echo $(($(date +%s) - start)) >"$name.seconds"
  return $rc
}

start=$(date +%s)
running=0
for item in "${queue[@]}"; do
  backend=${item%%:*} part=${item##*:}
  name="$LOG_DIR/$backend-$part"
  rm -f "$name.rc" "$name.seconds"
  if [ "$JOBS" -gt 1 ]; then
    echo "=== KERAS_BACKEND=$backend $part started, log: $name.log ==="
    run_part "$backend" "$part" "$@" >"$name.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
      wait -n
      running=$((running - 1))
    fi
  else
    echo "=== KERAS_BACKEND=$backend $part ==="
    run_part "$backend" "$part" "$@" 2>&1 | tee "$name.log"
  fi
done
wait

status=0
summary=""
for item in "${queue[@]}"; do
  backend=${item%%:*} part=${item##*:}
  name="$LOG_DIR/$backend-$part"
  if [ "$JOBS" -gt 1 ]; then
    echo "=== KERAS_BACKEND=$backend $part ($name.log) ==="
    cat "$name.log"
  fi
  rc=$(cat "$name.rc" 2>/dev/null || echo "no exit status")
  seconds=$(cat "$name.seconds" 2>/dev/null || echo "?")
  summary="$summary\n$backend $part: exit $rc in ${seconds}s"
  [ "$rc" != 0 ] && status=1
done
printf "=== summary ===%b\nwall time: %ss (JOBS=%s)\n" "$summary" \
  $(($(date +%s) - start)) "$JOBS"
exit $status
