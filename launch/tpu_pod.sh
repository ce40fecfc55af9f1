#!/usr/bin/env bash
# TPU pod (e.g. v5p-64): create or reuse the TPU VM, install this package on every worker, run on all.
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR configs/papers/bmretriever-2b-finetune.yaml [key=value ...]
#   e.g. launch/tpu_pod.sh bmr-v5p us-east5-a v5p-64 configs/papers/bmretriever-2b-finetune.yaml
# Installs the pinned extra .[tpu] (jax 0.10.2 + libtpu 0.0.42.1, what `bmr plan --target` compiled with).
# Needs the gcloud CLI; data and model folders must be reachable from every worker (e.g. a bucket mount).
set -euo pipefail
name=${1:?tpu name}; zone=${2:?zone}; accel=${3:?accelerator type}; config=${4:?config.yaml}; shift 4
version=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5}
if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" --version "$version"
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$repo" "$name":~/bmretriever-jax
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/bmretriever-jax && pip install -q -e '.[tpu]'"
args=$(printf ' %q' "$config" "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/bmretriever-jax && BMR_DISTRIBUTED=auto HF_HUB_OFFLINE=1 python -m bmretriever_jax.cli train${args}"
