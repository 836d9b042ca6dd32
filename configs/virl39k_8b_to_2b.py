r"""python -m vaopd_jax.train --config configs/virl39k_8b_to_2b.py:method=va_opd \
    --config.workdir=gs://BUCKET/vaopd/virl39k_8b_to_2b_va_opd \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
    --config.data.train_path=/data/ViRL39K/39Krelease.parquet \
    --config.data.val_path=/data/geometry3k/data

Qwen3-VL-8B -> 2B on ViRL39K (the larger training set, spec/METHOD.md).

Expect ~12,147 steps (5 epochs of 38,870 prompts, 16 per step); validation is
still the 200-problem Geometry3K subset. Paper Math avg / Visual avg: OPD
46.4/65.5 -> VA-OPD 50.2/68.0. `:method=opd|va_opd|reweight_only|group_only`.
"""

from vaopd_jax import config as config_lib


def get_config(arg=None):
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(arg)
  c.data.source = "virl39k"
  c.train.checkpoint_every = 200
  c.eval.every = 200
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
