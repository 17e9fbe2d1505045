#!/usr/bin/env bash
# Runs N jaxlm processes on this machine, joined by jax.distributed on 127.0.0.1 — the
# multi-host code path (per-process data, cross-process collectives over gloo, multi-process
# checkpoints) without a cluster.
#
#   launch/local.sh N <jaxlm args>
#   launch/local.sh 2 train --config tiny train.steps=20 run.dir=runs/mp
#
# Each process gets JAX_PLATFORMS=cpu and JAXLM_LOCAL_DEVICES simulated CPU devices
# (default 4), so N processes form a mesh of N × JAXLM_LOCAL_DEVICES devices. Output lines
# are prefixed with [pI]; with JAXLM_LOG_DIR set, each process also writes
# JAXLM_LOG_DIR/process_I.log. If one process fails the others are stopped; the exit code is
# that of the first process to fail (0 when all succeed).
# Environment: PYTHON (default python3), JAXLM_LOCAL_DEVICES, JAXLM_LOG_DIR, JAXLM_PORT
# (default: a free port), JAXLM_INIT_TIMEOUT (seconds, default 120).
set -uo pipefail

usage() { echo "usage: $0 NUM_PROCESSES <jaxlm args>   e.g. $0 2 train train.steps=20" >&2; }
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then usage; exit 2; fi
nproc="$1"; shift
python="${PYTHON:-python3}"
devices="${JAXLM_LOCAL_DEVICES:-4}"
timeout="${JAXLM_INIT_TIMEOUT:-120}"
port="${JAXLM_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log_dir="${JAXLM_LOG_DIR:-}"
[[ -n "$log_dir" ]] && mkdir -p "$log_dir"

pids=()
stop_all() {  # TERM each process group, then KILL what is left after a grace period
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq 20); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

set -m  # each process in its own process group, so stop_all reaches its children too
for ((i = 0; i < nproc; i++)); do
  (
    export JAX_PLATFORMS=cpu JAXLM_COORDINATOR_ADDRESS="127.0.0.1:$port" \
      JAXLM_NUM_PROCESSES="$nproc" JAXLM_PROCESS_ID="$i" JAXLM_INIT_TIMEOUT="$timeout"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    if [[ -n "$log_dir" ]]; then
      "$python" -u -m jaxlm.cli "$@" 2>&1 | tee "$log_dir/process_$i.log" | sed -u "s/^/[p$i] /"
    else
      "$python" -u -m jaxlm.cli "$@" 2>&1 | sed -u "s/^/[p$i] /"
    fi
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=("$!")
done
set +m

# Poll rather than `wait -n`, which older bash (macOS) lacks.
status=0
declare -a finished
for ((i = 0; i < nproc; i++)); do finished[i]=0; done
left=$nproc
while ((left > 0)); do
  for ((i = 0; i < nproc; i++)); do
    ((finished[i])) && continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    wait "${pids[i]}"
    rc=$?
    finished[i]=1
    left=$((left - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process $i exited with code $rc; stopping the others" >&2
      stop_all
      wait
      exit "$status"
    fi
  done
  ((left > 0)) && sleep 0.5
done
exit "$status"
