r"""python -m vaopd_jax.train --config configs/paper.py:teacher=8b,data=geo3k,method=va_opd \
    --config.workdir=gs://BUCKET/vaopd/geo3k_8b_to_2b_va_opd \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
    --config.data.train_path=/data/geometry3k/data --config.data.val_path=/data/geometry3k/data

The paper's runs: a Qwen3-VL-2B student distilled from a Qwen3-VL teacher, one variant
per teacher size, training set and method. `configs/base.py` is the main run (teacher=8b, data=geo3k).

  teacher=4b | 8b | 32b     the teacher's size. The run checks that config.teacher.hf_path's config.json is a
                            Qwen3-VL of that size (and the student's a 2B) before loading anything.
  teacher=30b-a3b | 235b-a22b   a mixture-of-experts teacher (Qwen3-VL-30B-A3B-Instruct / 235B-A22B-Instruct:
                            128 experts, top-8), checked the same way (width, depth, expert count and width).
  data=geo3k | virl39k      Geometry3K (2,101 prompts) or ViRL39K (38,870 prompts, multi-image rows); the
                            validation set is the 200-problem Geometry3K subset in both.
  method=va_opd | opd | reweight_only | group_only

Expect (5 epochs, 16 prompts x 4 rollouts of up to 4,096 tokens per step; paper Math avg / Visual avg,
avg@8, OPD -> VA-OPD):
  teacher=4b,data=geo3k    655 steps      45.3/64.4 -> 47.4/65.2
  teacher=8b,data=geo3k    655 steps      45.4/64.6 -> 48.3/66.1 (MathVerse 29.1 -> 31.9); ~6.5 h on 8xA100
                                          to reach standard OPD's final MathVerse score
  teacher=32b,data=geo3k   655 steps      51.1/65.3 -> 54.8/67.3
  teacher=8b,data=virl39k  12,145 steps  46.4/65.5 -> 50.2/68.0 (validation and checkpoints every 200 steps)
  teacher=30b-a3b / 235b-a22b   655 steps on Geometry3K; the paper has no MoE run, so no expected scores
                                (its gains grow with the teacher: 4B -> 8B -> 32B, +2.1 -> +2.9 -> +3.7 Math avg)
A MoE teacher: `configs/paper.py:teacher=30b-a3b` with --config.teacher.hf_path=/ckpt/Qwen3-VL-30B-A3B-Instruct.

  hardware=a100x8 | h100x8 | v5p-8 | v6e-8   the machine (default a100x8, the authors'): picks
                            train.micro_batch_rollouts from SIZING below; a teacher that one host cannot hold
                            names the host count it needs (e.g. v6e-8 -> v6e-32: launch on that slice).
  response=4096 | 2048      rollout.max_new_tokens (the paper: 4,096).

Meshes: FSDP over all devices (mesh.data=1, mesh.fsdp=-1); for the MoE teachers expert parallelism over all
devices (mesh.fsdp=1, mesh.expert=-1: each device holds 128 / devices experts of every layer, and the axis is
FSDP for the dense parts, the student included; it must divide 128, checked before loading).
Micro-batches: SIZING holds, per hardware x teacher x response, the largest micro-batch (64 = all rollouts at
once, 32, 16, 8) whose per-device peak, compiled for that hardware by its own compiler (the CUDA plugin with
the GPU's target description, libtpu for TPUs; no hardware needed), is within the card's HBM less 10 %:
`python -m vaopd_jax.bench.step --part table` (docs/performance.md, "Target-compiled memory", has the table,
the peaks and the command). Entries not yet compiled for their target fall back to the CPU-backend sizing
(CPU_MICRO_BATCH_ROLLOUTS: XLA's CPU backend on 8 x 80 GB, an upper bound, about 2x the GPU compiler's peak).

Sweeps over these variants: configs/sweep_ablation.py.
"""

from vaopd_jax import config as config_lib

TEACHERS = ("4b", "8b", "32b", "30b-a3b", "235b-a22b")
MOE_TEACHERS = ("30b-a3b", "235b-a22b")  # mesh: expert parallelism over all devices
HARDWARE = ("a100x8", "h100x8", "v5p-8", "v6e-8")
RESPONSES = (2048, 4096)
# (hardware, teacher, response) -> (target: the slice / hosts the step needs, rollouts per micro-batch with 64 =
# all at once, the target compiler's per-device peak in GB). Measured by `python -m vaopd_jax.bench.step --part
# table` (JAX 0.10.2 target compilers; docs/performance.md).
SIZING = {
    ("a100x8", "4b", 2048): ("a100x8", 64, 17.71),
    ("a100x8", "4b", 4096): ("a100x8", 64, 21.04),
    ("a100x8", "8b", 2048): ("a100x8", 64, 18.75),
    ("a100x8", "8b", 4096): ("a100x8", 64, 22.6),
    ("a100x8", "32b", 2048): ("a100x8", 64, 25.93),
    ("a100x8", "32b", 4096): ("a100x8", 64, 29.14),
    ("a100x8", "30b-a3b", 2048): ("a100x8", 64, 24.26),
    ("a100x8", "30b-a3b", 4096): ("a100x8", 64, 27.46),
    ("h100x8", "4b", 2048): ("h100x8", 64, 18.26),
    ("h100x8", "4b", 4096): ("h100x8", 64, 21.53),
    ("h100x8", "8b", 2048): ("h100x8", 64, 19.77),
    ("h100x8", "8b", 4096): ("h100x8", 64, 23.08),
    ("h100x8", "32b", 2048): ("h100x8", 64, 29.15),
    ("h100x8", "32b", 4096): ("h100x8", 64, 35.74),
    ("h100x8", "30b-a3b", 2048): ("h100x8", 64, 24.63),
    ("h100x8", "30b-a3b", 4096): ("h100x8", 64, 27.94),
    ("h100x8", "235b-a22b", 2048): ("h100x8", 64, 74.28),
    ("h100x8", "235b-a22b", 4096): ("h100x8", 32, 71.87),
    ("v6e-8", "8b", 4096): ("v6e-8", 32, 23.8),
}
# The CPU-backend sizing (8 x 80 GB, an upper bound): the fallback for entries not in SIZING.
CPU_MICRO_BATCH_ROLLOUTS = {"4b": 0, "8b": 32, "32b": 32, "30b-a3b": 32, "235b-a22b": 32}
DATA = {"geo3k": "geometry3k", "virl39k": "virl39k"}


def sizing(hardware: str, teacher: str, response: int) -> tuple[str, int, float | None]:
  """(target, train.micro_batch_rollouts (0: all rollouts at once), peak GB or None for the CPU fallback)."""
  if (hardware, teacher, response) in SIZING:
    target, micro, peak = SIZING[(hardware, teacher, response)]
    return target, 0 if micro == 64 else micro, peak
  return hardware, CPU_MICRO_BATCH_ROLLOUTS[teacher], None


def get_config(arg=None):
  """The paper's config for `arg` = 'teacher=<4b|8b|32b|30b-a3b|235b-a22b>,data=<geo3k|virl39k>,method=<method>,
  hardware=<a100x8|h100x8|v5p-8|v6e-8>,response=<4096|2048>'."""
  args = config_lib.parse_arg(arg, teacher="8b", data="geo3k", method="va_opd", hardware="a100x8", response=4096)
  if args.teacher not in TEACHERS:
    raise config_lib.ConfigError(f"configs/paper.py: teacher={args.teacher!r}; must be one of {TEACHERS}")
  if args.data not in DATA:
    raise config_lib.ConfigError(f"configs/paper.py: data={args.data!r}; must be one of {tuple(DATA)}")
  if args.hardware not in HARDWARE:
    raise config_lib.ConfigError(f"configs/paper.py: hardware={args.hardware!r}; must be one of {HARDWARE}")
  if args.response not in RESPONSES:
    raise config_lib.ConfigError(f"configs/paper.py: response={args.response}; must be one of {RESPONSES}")
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
  c.rollout.max_new_tokens = args.response
  _, c.train.micro_batch_rollouts, _ = sizing(args.hardware, args.teacher, args.response)
  if args.data == "virl39k":
    c.train.checkpoint_every = 200
    c.eval.every = 200
  return c
