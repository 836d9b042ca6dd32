#!/usr/bin/env bash
# Train on one multi-GPU host (one process drives all local GPUs), or on several
# hosts without a scheduler (one process per host; give each the same
# coordinator address and its own process id).
#
# Install once per host, from the repository root (CUDA 12 wheels; ".[cuda13]" for CUDA 13 drivers):
#   pip install -e ".[cuda]"
# The script stops before training if JAX sees no GPU (a CPU-only JAX would run the paper config at CPU speed).
#
#   launch/gpu_host.sh configs/paper.py:teacher=8b,data=geo3k,method=va_opd --config.workdir=/runs/geo3k_8b_va_opd \
#       --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
#       --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data
#
#   # two hosts (run on each; PROCESS_ID=0 on the host at COORDINATOR):
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_host.sh CONFIG ...
#
# The mesh comes from --config.mesh.{data,fsdp,tensor} (default: FSDP over all
# GPUs for the *_to_2b configs). The workdir must be shared by all hosts
# (NFS or gs://). Re-running the same command resumes from the last checkpoint.
set -euo pipefail
config=${1:?usage: $0 CONFIG [--config.field=value ...]}
shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Overlap collectives with compute on GPUs (latency-hiding scheduler).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [[ -n "${COORDINATOR:-}" ]]; then
  # Read by jax.distributed.initialize() (vaopd_jax.parallel.mesh.maybe_initialize_distributed).
  export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=${NUM_PROCESSES:?} JAX_PROCESS_ID=${PROCESS_ID:?}
fi
cd "$(dirname "$0")/.."
XLA_PYTHON_CLIENT_PREALLOCATE=false python -c 'import jax, sys; b = jax.default_backend(); print(f"JAX {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind} ({b})"); sys.exit(b != "gpu")' || {
  echo "JAX found no GPU on $(hostname). Install the CUDA build: pip install -e \".[cuda]\" (or \".[cuda13]\"), check nvidia-smi and CUDA_VISIBLE_DEVICES." >&2
  exit 1
}
exec python -m vaopd_jax.train --config "$config" "$@"
