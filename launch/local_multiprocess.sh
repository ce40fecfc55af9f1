#!/usr/bin/env bash
# N local processes on one machine (CPU collectives), e.g. to rehearse a multi-host run:
#   launch/local_multiprocess.sh 2 configs/quickstart.yaml train.steps=10
# Rehearse a preemption: `kill -TERM <this script's pid>` (forwarded to every process; or signal just one of
# them): all stop at one step, save it and exit 143; rerun with any N that divides the global batch to resume.
set -euo pipefail
n=${1:?number of processes}; config=${2:?config.yaml}; shift 2
port=${BMR_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  BMR_COORDINATOR="127.0.0.1:${port}" BMR_NUM_PROCESSES="$n" BMR_PROCESS_ID="$i" \
  XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=1}" \
    python -m bmretriever_jax.cli train "$config" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
status=0
for p in "${pids[@]}"; do
  rc=0
  wait "$p" || rc=$?
  while kill -0 "$p" 2>/dev/null; do  # the wait was cut short by the forwarded SIGTERM: wait for the exit
    rc=0
    wait "$p" || rc=$?
  done
  if [ "$rc" -ne 0 ]; then status=$rc; fi
done
exit "$status"
