r"""python -m vaopd_jax.train --config configs/paper.py:teacher=8b,data=geo3k,method=va_opd \
    --config.workdir=gs://BUCKET/vaopd/geo3k_8b_to_2b_va_opd \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
    --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data

The paper's runs (spec/METHOD.md): a Qwen3-VL-2B student distilled from a Qwen3-VL teacher, one variant
per teacher size, training set and method. `configs/base.py` is the main run (teacher=8b, data=geo3k).

  teacher=4b | 8b | 32b     the teacher's size. The run checks that config.teacher.hf_path's config.json is a
                            Qwen3-VL of that size (and the student's a 2B) before loading anything.
  teacher=30b-a3b | 235b-a22b   a mixture-of-experts teacher (Qwen3-VL-30B-A3B-Instruct / 235B-A22B-Instruct:
                            128 experts, top-8), checked the same way (width, depth, expert count and width).
  data=geo3k | virl39k      Geometry3K (2,101 prompts) or ViRL39K (38,870 prompts, multi-image rows); the
                            validation set is the 200-problem Geometry3K subset in both.
  method=va_opd | opd | reweight_only | group_only

Expect (5 epochs, 16 prompts x K=4 rollouts of up to 4,096 tokens per step; paper Math avg / Visual avg,
avg@8, OPD -> VA-OPD):
  teacher=4b,data=geo3k    655 steps      45.3/64.4 -> 47.4/65.2
  teacher=8b,data=geo3k    655 steps      45.4/64.6 -> 48.3/66.1 (MathVerse 29.1 -> 31.9); ~6.5 h on 8xA100
                                          to reach standard OPD's final MathVerse score
  teacher=32b,data=geo3k   655 steps      51.1/65.3 -> 54.8/67.3
  teacher=8b,data=virl39k  12,145 steps  46.4/65.5 -> 50.2/68.0 (validation and checkpoints every 200 steps)
  teacher=30b-a3b / 235b-a22b   655 steps on Geometry3K; the paper has no MoE run, so no expected scores
                                (its gains grow with the teacher: 4B -> 8B -> 32B, +2.1 -> +2.9 -> +3.7 Math avg)
A MoE teacher: `configs/paper.py:teacher=30b-a3b` with --config.teacher.hf_path=/ckpt/Qwen3-VL-30B-A3B-Instruct.

Meshes: FSDP over all devices (mesh.data=1, mesh.fsdp=-1); for the MoE teachers expert parallelism over all
devices (mesh.fsdp=1, mesh.expert=-1: each device holds 128 / devices experts of every layer, and the axis is
FSDP for the dense parts, the student included; it must divide 128, checked before loading). Memory: every
dense teacher and the 30B-A3B fit one 8 x 80 GB host at the paper's shapes, the 235B-A22B four such hosts; the
8B, 32B and MoE teachers with micro-batches of 32 rollouts (`train.micro_batch_rollouts`, set below: same loss
and gradient, two teacher/student passes per step; for 8B it keeps the step within 50 GB). Per-device peak of
the compiled step on fsdp=8 (`python -m vaopd_jax.bench.step --part aot`: 16x4 rollouts, prompt 1,024, chunked
attention; the largest micro-batch within 72 GB; CPU-compiled, so upper bounds):
  teacher   response 2,048               response 4,096
  4b        44.8 GB (all 64 at once)     57.7 GB (all at once)
  8b        48.5 GB (all at once)        63.1 GB (all at once); 38.0 GB with micro_batch_rollouts=32
  32b       62.1 GB (32: 2 micro-batches; all at once 76.7)   66.4 GB (32; all at once 92.9)
MoE teachers at response 4,096 with expert parallelism (mesh expert=<all devices>), micro_batch_rollouts=32:
  30b-a3b   8 x 80 GB (expert=8): 42.0 GB (all 64 at once 74.1 GB; fsdp=8 instead of expert=8: 49.5 GB)
  235b-a22b 32 x 80 GB, 4 hosts (expert=32): 63.7 GB (all 64 at once 70.8 GB, within 72 GB but with no margin);
            16 x 80 GB (expert=16) does not fit (110.3 GB)

Sweeps over these variants: configs/sweep_ablation.py.
"""

from vaopd_jax import config as config_lib

TEACHERS = ("4b", "8b", "32b", "30b-a3b", "235b-a22b")
MOE_TEACHERS = ("30b-a3b", "235b-a22b")  # mesh: expert parallelism over all devices
# Rollouts per micro-batch (0: all 64 at once): the largest within 72 GB per device on 8 x 80 GB (table above);
# 8B takes 32 as well, so its step stays within 50 GB per device (38.0 GB at response 4,096); 235B-A22B (on
# 32 x 80 GB) takes 32 for margin (63.7 GB; all at once 70.8 GB).
MICRO_BATCH_ROLLOUTS = {"4b": 0, "8b": 32, "32b": 32, "30b-a3b": 32, "235b-a22b": 32}
DATA = {"geo3k": "geometry3k", "virl39k": "virl39k"}


def get_config(arg=None):
  """The paper's config for `arg` = 'teacher=<4b|8b|32b|30b-a3b|235b-a22b>,data=<geo3k|virl39k>,method=<method>'."""
  args = config_lib.parse_arg(arg, teacher="8b", data="geo3k", method="va_opd")
  if args.teacher not in TEACHERS:
    raise config_lib.ConfigError(f"configs/paper.py: teacher={args.teacher!r}; must be one of {TEACHERS}")
  if args.data not in DATA:
    raise config_lib.ConfigError(f"configs/paper.py: data={args.data!r}; must be one of {tuple(DATA)}")
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(f"method={args.method}")
  c.teacher.size = args.teacher   # checked against teacher.hf_path's config.json
  c.student.size = "2b"
  c.data.source = DATA[args.data]
  c.data.val_source = "geometry3k"
  c.mesh.data = 1
  c.mesh.tensor = 1
  if args.teacher in MOE_TEACHERS:
    c.mesh.fsdp = 1
    c.mesh.expert = -1   # all devices: experts split over them, the dense parts FSDP-sharded over them
  else:
    c.mesh.fsdp = -1   # all devices: FSDP alone needs less memory than FSDP x tensor=2 (see above)
    c.mesh.expert = 1
  c.train.micro_batch_rollouts = MICRO_BATCH_ROLLOUTS[args.teacher]
  if args.data == "virl39k":
    c.train.checkpoint_every = 200
    c.eval.every = 200
  return c
