r"""Ablation sweep: 4 methods x 3 teacher sizes on Geometry3K (12 runs, docs/method.md "Ablations").

  python launch/sweep.py configs/sweep_ablation.py --workdir_root=gs://BUCKET/vaopd/sweep \
      --ckpt_root=/ckpt --data_root=/data/geometry3k/data            # prints the 12 commands
  python launch/sweep.py configs/sweep_ablation.py ... --mode=local   # runs them one after another
  python launch/sweep.py configs/sweep_ablation.py ... --mode=slurm   # one sbatch job each (launch/slurm.sbatch)

Expect per run the figures of the matching configs/paper.py variant; the table
to fill: validation accuracy (best) and mean student VA for
{opd, reweight_only, group_only, va_opd} x {4B, 8B, 32B} teachers.
`get_sweep(arg)` returns the runs; `arg` may restrict them, e.g.
`configs/sweep_ablation.py:teachers=8b,methods=opd+va_opd`; the mixture-of-experts teachers are opt-in:
`teachers=30b-a3b` (one 8 x 80 GB host) or `235b-a22b` (four).
"""

from vaopd_jax import config as config_lib

TEACHERS = {"4b": "Qwen3-VL-4B-Instruct", "8b": "Qwen3-VL-8B-Instruct", "32b": "Qwen3-VL-32B-Instruct",
            "30b-a3b": "Qwen3-VL-30B-A3B-Instruct", "235b-a22b": "Qwen3-VL-235B-A22B-Instruct"}
STUDENT = "Qwen3-VL-2B-Instruct"


def get_sweep(arg=None):
  """Returns one dict per run: name, config (file:variant), method, teacher, overrides."""
  args = config_lib.parse_arg(arg, teachers="4b+8b+32b", methods="+".join(config_lib.METHODS))
  runs = []
  for teacher in args.teachers.split("+"):
    if teacher not in TEACHERS:
      raise config_lib.ConfigError(f"sweep teacher {teacher!r}: must be one of {sorted(TEACHERS)}")
    for method in args.methods.split("+"):
      if method not in config_lib.METHODS:
        raise config_lib.ConfigError(f"sweep method {method!r}: must be one of {config_lib.METHODS}")
      runs.append({
          "name": f"geo3k_{teacher}_to_2b_{method}",
          "config": f"configs/paper.py:teacher={teacher},data=geo3k,method={method}",
          "method": method,
          "teacher": teacher,
          # {ckpt_root} and {data_root} are filled in by launch/sweep.py.
          "overrides": {
              "student.hf_path": "{ckpt_root}/" + STUDENT,
              "teacher.hf_path": "{ckpt_root}/" + TEACHERS[teacher],
              "data.train_path": "{data_root}",
              "data.val_path": "{data_root}",
          },
      })
  return runs
