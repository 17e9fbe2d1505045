#!/usr/bin/env bash
# Runs jaxlm on every worker of a Cloud TPU VM slice (v4, v5e, v5p, v6e) at once.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR [--version RUNTIME]
#                     [--project P] [--create] [--queued] [--spot] [--slices N] [--dry-run]
#                     -- <jaxlm args>
#
#   launch/tpu_pod.sh --name lm --zone us-central2-b --type v4-32 --create -- \
#       train --config tiny run.dir=/mnt/runs/tiny
#
# Steps: (1) with --create, create the slice (`tpu-vm create`, or a queued resource with
# --queued; --slices N > 1 always uses a queued resource, whose nodes are NAME-0..NAME-N-1);
# (2) copy this checkout (tracked and untracked, not ignored, files) to every worker;
# (3) pip install ".[tpu]" there; (4) run `python3 -m jaxlm.cli <jaxlm args>` on all workers
# together. jax.distributed finds the other workers from the TPU metadata
# (JAXLM_DISTRIBUTED=auto). Each worker tees its output to ~/jaxlm-logs/<hostname>.log.
# With --slices N each node's workers also get MEGASCALE_COORDINATOR_ADDRESS (worker 0 of
# NAME-0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT, which libtpu (DCN
# between slices) and jax.distributed read; jaxlm's mesh then puts mesh.data across the slices
# (mesh.dcn_data=-1, the default), so only gradient reductions cross DCN.
# Checkpoints: run.dir must be storage that every worker sees at the same path
# (run.dir=gs://bucket/runs/NAME with gcsfs installed, or a shared mount).
# --dry-run prints every command, one per line, instead of running it.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name="" zone="" type="" version="" project="" create=0 queued=0 spot=0 slices=1 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:-}"; shift 2 ;;
    --zone) zone="${2:-}"; shift 2 ;;
    --type) type="${2:-}"; shift 2 ;;
    --version) version="${2:-}"; shift 2 ;;
    --project) project="${2:-}"; shift 2 ;;
    --slices) slices="${2:-}"; shift 2 ;;
    --create) create=1; shift ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "unknown option '$1' (jaxlm arguments go after --)" ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$type" ]] || die "--name, --zone and --type are required"
[[ $# -gt 0 ]] || die "no jaxlm arguments after -- (e.g. -- train --config tiny)"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$slices'"
((slices > 1)) && queued=1  # multislice exists only as a queued resource

# The TPU VM base image per accelerator family (cloud.google.com/tpu/docs/runtimes).
if [[ -z "$version" ]]; then
  case "$type" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator type '$type'; pass --version" ;;
  esac
fi

gflags=(--zone="$zone")
[[ -n "$project" ]] && gflags+=(--project="$project")

quote() {  # one word as the shell reads it back: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {  # prints (dry run) or runs one command; the printed form is shell-quoted
  if ((dry_run)); then
    local out="" word
    for word in "$@"; do out+="$(quote "$word") "; done
    echo "${out% }"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

nodes=()
if ((slices > 1)); then
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
else
  nodes=("$name")
fi

# 1. Create.
if ((create)); then
  if ((queued)); then
    create_cmd=(gcloud compute tpus queued-resources create "$name" "${gflags[@]}"
      --accelerator-type="$type" --runtime-version="$version")
    if ((slices > 1)); then
      create_cmd+=(--node-count="$slices" --node-prefix="$name")
    else
      create_cmd+=(--node-id="$name")
    fi
    ((spot)) && create_cmd+=(--spot)
    run "${create_cmd[@]}"
    wait_cmd=(gcloud compute tpus queued-resources describe "$name" "${gflags[@]}"
      --format="value(state.state)")
    if ((dry_run)); then
      run "${wait_cmd[@]}"
    else
      echo "waiting for queued resource $name to become ACTIVE ..." >&2
      until [[ "$("${wait_cmd[@]}")" == "ACTIVE" ]]; do sleep 30; done
    fi
  else
    create_cmd=(gcloud compute tpus tpu-vm create "$name" "${gflags[@]}"
      --accelerator-type="$type" --version="$version")
    ((spot)) && create_cmd+=(--spot)
    run "${create_cmd[@]}"
  fi
fi

# 2. Code: this checkout as a tarball (tracked + untracked, minus .gitignore'd files).
repo="$(cd "$(dirname "$0")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/jaxlm-src-$name.tar.gz"
if ((dry_run)); then
  echo "tar -czf $tarball -C $repo <git ls-files -co --exclude-standard>"
else
  (cd "$repo" && git ls-files -z -co --exclude-standard \
    | tar --null --ignore-failed-read -czf "$tarball" -T -)
fi
for node in "${nodes[@]}"; do
  run gcloud compute tpus tpu-vm scp "$tarball" "$node:jaxlm-src.tar.gz" "${gflags[@]}" \
    --worker=all
done

# 3. Install, 4. run: on every worker of every node at once.
install='rm -rf ~/jaxlm && mkdir -p ~/jaxlm && tar -xzf ~/jaxlm-src.tar.gz -C ~/jaxlm'
install+=' && cd ~/jaxlm && python3 -m pip install -q -e ".[tpu]"'
jaxlm_args=""
for word in "$@"; do jaxlm_args+="$(quote "$word") "; done
train='cd ~/jaxlm && mkdir -p ~/jaxlm-logs && export JAXLM_DISTRIBUTED=auto'
run_jaxlm=" && python3 -m jaxlm.cli ${jaxlm_args% } 2>&1 | tee ~/jaxlm-logs/\$(hostname).log"
# shellcheck disable=SC2016  # expands on the worker
run_jaxlm+='; exit ${PIPESTATUS[0]}'

# Multislice: the slices meet at worker 0 of the first node (its internal address).
megascale_port=8080
coordinator_ip=""
if ((slices > 1)); then
  ip_cmd=(gcloud compute tpus tpu-vm describe "${nodes[0]}" "${gflags[@]}"
    --format="value(networkEndpoints[0].ipAddress)")
  if ((dry_run)); then
    run "${ip_cmd[@]}"
    coordinator_ip="COORDINATOR_IP"
  else
    coordinator_ip="$("${ip_cmd[@]}")"
    [[ -n "$coordinator_ip" ]] || die "no internal address for worker 0 of ${nodes[0]}"
  fi
fi
node_command() {  # $1 = slice id: the worker command of that node
  local cmd="$train"
  if ((slices > 1)); then
    cmd+=" MEGASCALE_COORDINATOR_ADDRESS=$coordinator_ip:$megascale_port"
    cmd+=" MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$1 MEGASCALE_PORT=$megascale_port"
  fi
  printf '%s' "$cmd$run_jaxlm"
}

for node in "${nodes[@]}"; do
  run gcloud compute tpus tpu-vm ssh "$node" "${gflags[@]}" --worker=all --command="$install"
done
pids=()
for i in "${!nodes[@]}"; do
  node="${nodes[i]}"
  if ((dry_run)) || ((slices == 1)); then
    run gcloud compute tpus tpu-vm ssh "$node" "${gflags[@]}" --worker=all \
      --command="$(node_command "$i")"
  else  # slices start together: jax.distributed waits for all of them
    run gcloud compute tpus tpu-vm ssh "$node" "${gflags[@]}" --worker=all \
      --command="$(node_command "$i")" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
