#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker; JAX
# finds the other hosts by itself (jax.distributed.initialize() on Cloud TPU).
#
#   export TPU_NAME=vaopd-v5p-64 ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 \
#          RUNTIME_VERSION=v2-alpha-tpuv5 BUCKET=gs://my-bucket
#   launch/tpu_pod.sh create                  # create the slice
#   launch/tpu_pod.sh setup                   # copy this repo to every worker, pip install -e ".[tpu]"
#   launch/tpu_pod.sh run configs/paper.py:teacher=8b,data=geo3k,method=va_opd \
#       --config.workdir=$BUCKET/vaopd/geo3k_8b_va_opd \
#       --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
#       --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data
#   launch/tpu_pod.sh logs                    # copy worker logs to ./tpu_logs/
#   launch/tpu_pod.sh delete
#
# Checkpoints, tensorboard logs and the exported students go to --config.workdir
# (use a gs:// path so every worker sees it); only process 0 writes logs and
# exports. Model and data paths must exist on every worker (bake them into the
# image, copy them with `gcloud storage cp` in setup, or mount a shared disk).
# Re-running `run` with the same workdir resumes from the latest checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-vaopd_jax}
HERE=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ;;
  setup)
    tar -C "$HERE" --exclude=.git --exclude='*.egg-info' -czf /tmp/vaopd_jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/vaopd_jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/vaopd_jax.tgz && \
      pip install -q -e ~/$REMOTE_DIR'[tpu]'" ;;
  run)
    shift
    config=$1; shift
    args=$(printf ' %q' "$@")
    # nohup + a log per worker: an ssh drop does not kill the run.
    ssh_all "cd ~/$REMOTE_DIR && nohup python -m vaopd_jax.train --config $config $args \
      > ~/vaopd_train.log 2>&1 &"
    echo "started on all workers; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/vaopd_train.log'" ;;
  logs)
    mkdir -p tpu_logs
    n=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(networkEndpoints.len())')
    for ((w = 0; w < n; w++)); do
      gcloud compute tpus tpu-vm scp "$TPU_NAME":~/vaopd_train.log "tpu_logs/worker_$w.log" --zone="$ZONE" --worker="$w"
    done ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|run CONFIG [--config.field=value ...]|logs|delete" >&2; exit 2 ;;
esac
