#!/usr/bin/env bash
# Runs the test suite once per backend, each in its own process
# (KERAS_BACKEND is fixed per process). Exits non-zero if any backend fails.
set -u
VENV=${VENV:-.venv}
BACKENDS=${BACKENDS:-"torch jax tensorflow"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
export JAX_PLATFORMS=cpu
status=0
summary=""
for backend in $BACKENDS; do
  echo "=== KERAS_BACKEND=$backend ==="
  start=$(date +%s)
  KERAS_BACKEND=$backend "$VENV/bin/python" -m pytest -q -rfE --durations=10 "$@"
  rc=$?
  summary="$summary\n$backend: exit $rc in $(( $(date +%s) - start ))s"
  [ $rc -ne 0 ] && status=1
done
printf "=== summary ===%b\n" "$summary"
exit $status
