r"""python -m vaopd_jax.train --config configs/geo3k_8b_to_2b.py:method=va_opd \
    --config.workdir=gs://BUCKET/vaopd/geo3k_8b_to_2b_va_opd \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
    --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data

Qwen3-VL-8B -> 2B on Geometry3K: the paper's main run (spec/METHOD.md).

Expect 657 steps (5 epochs of 2,101 prompts, 16 x K=4 rollouts per step),
validation accuracy on 200 Geometry3K validation problems every 50 steps.
Paper (avg@8): MathVerse 29.1 (OPD) -> 31.9 (VA-OPD); Math avg 45.4 -> 48.3,
Visual avg 64.6 -> 66.1. `:method=opd|va_opd|reweight_only|group_only`.
Shard the 8B teacher and 2B student with FSDP over a host's 8 chips.
"""

from vaopd_jax import config as config_lib


def get_config(arg=None):
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(arg)
  c.data.source = "geometry3k"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
