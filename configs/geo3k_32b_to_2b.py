r"""python -m vaopd_jax.train --config configs/geo3k_32b_to_2b.py:method=va_opd \
    --config.workdir=gs://BUCKET/vaopd/geo3k_32b_to_2b_va_opd \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-32B-Instruct \
    --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data

Qwen3-VL-32B -> 2B on Geometry3K (teacher-scaling variant, spec/METHOD.md).

Expect 657 steps; paper Math avg / Visual avg: OPD 51.1/65.3 -> VA-OPD 54.8/67.3.
The 32B teacher (~64 GB in bf16) is sharded with FSDP. Measured peak memory per
device of the compiled step (`python -m vaopd_jax.bench.step --part aot
--teachers 32b`, 16x4 rollouts, prompt 1,024, chunked attention):
  response 4,096: 16 devices (fsdp=16) 58.4 GB; 8 devices (fsdp=8) 94.0 GB,
    88.6 GB with --config.model.attention_chunk_size=256; fsdp=4 x tensor=2 117.3 GB;
  response 2,048: 8 devices (fsdp=8) 77.3 GB.
So run the paper's 4,096-token responses on 16 x 80 GB devices (or a TPU pod
slice), or on 8 devices with more than 94 GB each (H200); on one 8 x 80 GB host
add --config.rollout.max_new_tokens=2048.
`:method=opd|va_opd|reweight_only|group_only`.
"""

from vaopd_jax import config as config_lib


def get_config(arg=None):
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(arg)
  c.data.source = "geometry3k"
  c.mesh.data = 1
  c.mesh.fsdp = -1   # all devices: FSDP alone needs less memory than FSDP x tensor=2 here (see above)
  c.mesh.tensor = 1
  return c
