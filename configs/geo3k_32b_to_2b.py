r"""python -m vaopd_jax.train --config configs/geo3k_32b_to_2b.py:method=va_opd \
    --config.workdir=gs://BUCKET/vaopd/geo3k_32b_to_2b_va_opd \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-32B-Instruct \
    --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data

Qwen3-VL-32B -> 2B on Geometry3K (teacher-scaling variant, spec/METHOD.md).

Expect 657 steps; paper Math avg / Visual avg: OPD 51.1/65.3 -> VA-OPD 54.8/67.3.
The 32B teacher (~64 GB in bf16) is sharded with FSDP x tensor parallelism;
run it on a TPU pod slice or at least one 8x80GB host.
`:method=opd|va_opd|reweight_only|group_only`.
"""

from vaopd_jax import config as config_lib


def get_config(arg=None):
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(arg)
  c.data.source = "geometry3k"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 2
  return c
