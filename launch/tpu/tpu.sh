#!/bin/bash
# Multi-host TPU VM slices with gcloud: create a slice, install batchax on every worker, run one training command
# on all workers at once (each worker is one process of the job; launch.train --distributed_auto reads the TPU
# environment), fetch each worker's log, delete the slice.
#
#   export TPU_NAME=batchax-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 NUM_WORKERS=4 [PROJECT=my-project]
#   launch/tpu/tpu.sh create
#   launch/tpu/tpu.sh setup                   # clone (REPO_URL) and pip install -e '.[tpu]' on every worker
#   launch/tpu/tpu.sh train --config=configs/lm_1b.py --workdir=gs://BUCKET/runs/lm_1b
#   launch/tpu/tpu.sh logs                    # ./tpu-logs/worker-<i>.log from every worker
#   launch/tpu/tpu.sh delete
#
# DRY_RUN=1 prints every command instead of running it. The workdir must be one every worker sees (gs://...).
set -euo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
: "${TPU_NAME:?set TPU_NAME (the slice name)}" "${ZONE:?set ZONE (e.g. us-west4-a)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
NUM_WORKERS="${NUM_WORKERS:-1}"
REPO_URL="${REPO_URL:-https://github.com/batchax/batchax}"
PROJECT_ARGS=()
[[ -n "${PROJECT:-}" ]] && PROJECT_ARGS=(--project="${PROJECT}")

run() {  # runs a command, or prints it (shell-quoted) with DRY_RUN=1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_ARGS[@]}" --worker=all --command="$1"
}

command="$1"
shift
case "${command}" in
  create)
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_ARGS[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" ;;
  setup)
    on_all_workers "(git clone -q ${REPO_URL} batchax || git -C batchax pull -q) && cd batchax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'" ;;
  train)
    # The same command on every worker, at once: they meet at the coordinator jax finds in the TPU metadata.
    on_all_workers "cd batchax && .venv/bin/python -m launch.train --distributed_auto $(printf '%q ' "$@")2>&1 | tee train.log" ;;
  logs)
    run mkdir -p tpu-logs
    for ((i = 0; i < NUM_WORKERS; i++)); do
      run gcloud compute tpus tpu-vm scp "${TPU_NAME}:batchax/train.log" "tpu-logs/worker-${i}.log" \
        --zone="${ZONE}" "${PROJECT_ARGS[@]}" --worker="${i}"
    done ;;
  delete)
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_ARGS[@]}" --quiet ;;
  *)
    echo "unknown command: ${command}" >&2
    usage ;;
esac
