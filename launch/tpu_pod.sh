#!/usr/bin/env bash
# TPU pod (e.g. v5p-64): create or reuse the TPU VM, install this package on every worker, run on all, and
# start the run again until it finishes.
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR configs/papers/bmretriever-2b-finetune.yaml [key=value ...]
#   e.g. launch/tpu_pod.sh bmr-v5p us-east5-a v5p-64 configs/papers/bmretriever-2b-finetune.yaml
# Installs the pinned extra .[tpu] (jax 0.10.2 + libtpu 0.0.42.1, what `bmr plan --target` compiled with).
# Needs the gcloud CLI; data, model and `out` folders must be reachable from every worker (e.g. a bucket mount),
# and `out` must outlive the VM: the checkpoints there are what a restart resumes from.
#
# Restarts (docs/preemption.md): a maintenance event or a Spot reclaim sends SIGTERM to the workers; every
# process stops at one agreed step, saves it and exits 143 (PREEMPTED_EXIT_CODE). The exit status says what
# to do: 0 = the run finished: stop; 2 = a config or input error (one line, a rerun would fail the same way):
# stop; anything else (143 preempted after saving, 255 = ssh lost because the VM went away, a crash) = wait
# until the VM is READY again (a preempted Spot VM is deleted and created anew) and rerun the same command,
# which resumes from the newest checkpoint; at most TPU_MAX_RESTARTS (default 100) times. For a pod of another
# size, run this script with the new accelerator type and the same config: the checkpoint reshards.
set -uo pipefail
name=${1:?tpu name}; zone=${2:?zone}; accel=${3:?accelerator type}; config=${4:?config.yaml}; shift 4
version=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5}
max_restarts=${TPU_MAX_RESTARTS:-100}
repo=$(cd "$(dirname "$0")/.." && pwd)
args=$(printf ' %q' "$config" "$@")

state() { gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format='value(state)' 2>/dev/null; }

prepare() {  # a READY VM with this package installed on every worker
  local s
  s=$(state)
  if [ "$s" = "PREEMPTED" ] || [ "$s" = "TERMINATED" ]; then
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    s=""
  fi
  if [ -z "$s" ]; then
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version" ||
      return 1
  fi
  until [ "$(state)" = "READY" ]; do sleep 30; done
  gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$repo" "$name":~/bmretriever-jax &&
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
      "cd ~/bmretriever-jax && pip install -q -e '.[tpu]'"
}

for ((attempt = 0; attempt <= max_restarts; attempt++)); do
  if prepare; then
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
      "cd ~/bmretriever-jax && BMR_DISTRIBUTED=auto HF_HUB_OFFLINE=1 python -m bmretriever_jax.cli train${args}"
    rc=$?
  else
    rc=1
  fi
  case "$rc" in
    0) echo "bmr: run finished"; exit 0 ;;
    2) echo "bmr: a config or input error (see the line above); not restarting"; exit 2 ;;
    143) echo "bmr: preempted after saving (exit 143); restarting (attempt $((attempt + 1)))" ;;
    *) echo "bmr: exit $rc (VM lost or a crash); restarting from the newest checkpoint (attempt $((attempt + 1)))" ;;
  esac
  sleep 60
done
echo "bmr: gave up after $max_restarts restarts"
exit 1
