#!/usr/bin/env bash
# A multi-host run on this machine: P processes of the study on loopback, joined by
# jax.distributed (CPU devices, gloo collectives). It exercises the path a SLURM job takes across
# nodes (launch/slurm.sh): each process reads its own rows of every batch, only process 0 writes
# metadata, reports and progress bars, orbax saves collectively.
#
#   launch/local_multiprocess.sh P [flags of python -m oneshui_jax.main ...]
#   launch/local_multiprocess.sh 2 --config=configs/synthfaces.py --config.stages='("pretrain",)'
#
# ONESHUI_LOCAL_DEVICES (default 1): CPU devices per process. ONESHUI_PORT: the coordinator's port
# (default: a free one). Process 0 prints to this terminal; the others log to
# ${ONESHUI_LOG_DIR:-<a temporary folder>}/process_<i>.log, printed when a process fails. The exit
# status is the first failing process's (0 when all succeed); a failure stops the others.
set -uo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: expected the number of processes first (launch/local_multiprocess.sh P [flags])," \
       "got '${1-}'" >&2
  exit 2
fi
P="$1"; shift
PY="${PYTHON:-python}"
PORT="${ONESHUI_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOGS="${ONESHUI_LOG_DIR:-$(mktemp -d -t oneshui_processes.XXXXXX)}"
mkdir -p "$LOGS"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${ONESHUI_LOCAL_DEVICES:-1}"
pids=()
for ((i = 0; i < P; i++)); do
  args=(-m oneshui_jax.main --distributed "--coordinator_address=127.0.0.1:$PORT"
        "--num_processes=$P" "--process_id=$i" "$@")
  if [[ $i -eq 0 ]]; then
    "$PY" "${args[@]}" &
  else
    "$PY" "${args[@]}" >"$LOGS/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  wait -n -p done_pid "${remaining[@]}"
  rc=$?
  left=()
  for pid in "${remaining[@]}"; do [[ "$pid" != "$done_pid" ]] && left+=("$pid"); done
  remaining=("${left[@]}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    for ((i = 0; i < P; i++)); do
      if [[ "${pids[$i]}" == "$done_pid" ]]; then
        echo "error: process $i of $P exited with status $rc; stopping the others" >&2
        [[ $i -gt 0 ]] && tail -n 30 "$LOGS/process_$i.log" >&2
      fi
    done
    kill "${remaining[@]}" 2>/dev/null
  fi
done
exit "$status"
