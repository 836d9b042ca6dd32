r"""python -m vaopd_jax.study --config configs/study.py [--quick] [--config.study.seeds=1,2,3,4,5 ...]

OPD against VA-OPD and its two halves (reweighting only, grouping only) on the
demo's synthetic task (configs/demo.py), over several seeds, through the real
trainer. Each seed has its own teacher and student warm-up, taught once and
shared by the methods (<study.workdir>/warmups/<role>-<fingerprint of its
settings>); each (method, seed) is one trainer run in
<study.workdir>/<method>/seed_<s> (vaopd_jax/study.py, `run_one`), reused when
it finished with the same settings. A progress line with the ETA precedes each
run. The study writes results.json, table.md (fine-detail accuracy per step,
every metric at the first and last step, steps to OPD's final accuracy and to
`study.threshold`, the mechanism series when the trainer logs them), curves.png
and mechanism.png.

Default: 4 methods x 3 seeds x 80 steps (seeds 1-3: the settings were chosen
on seed 0), sized for well under 45 minutes on an idle 2-core CPU; docs/study.md
has the measured wall time. `--quick` shrinks everything to seconds per run
(the test suite's end-to-end check); its numbers mean nothing.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.train_config = "configs/demo.py"   # the trainer config every run starts from (relative to the repo root)
  c.study = ml_collections.ConfigDict()
  c.study.workdir = "/tmp/vaopd_study"
  c.study.methods = ("opd", "reweight_only", "group_only", "va_opd")
  c.study.seeds = (1, 2, 3)            # config.seed of the runs (warm-ups, data order, sampling); the settings
                                       # were chosen on seed 0 (docs/study.md)
  c.study.num_steps = 80
  c.study.eval_every = 10
  c.study.eval_num_problems = 64
  c.study.threshold = 0.7              # steps to reach this fine-detail accuracy are reported too
  # Warm-ups: one teacher and one student per seed (False), shared by the methods; True: one pair for all seeds.
  c.study.shared_warmups = False
  # A sweep repeats the whole grid at each value of one trainer field (configs/dilution.py); '' = no sweep.
  c.study.sweep_field = ""
  c.study.sweep_values = ()
  # Any trainer field for every run, e.g. {"optim.lr": 1e-3}; the study's own fields above win.
  c.study.overrides = ml_collections.ConfigDict(allow_dotted_keys=True)
  # The mechanism, logged for every method: the teacher's VA also for OPD, and the share of the loss's gradient
  # on the vision-critical tokens (one more student pass per step).
  c.study.overrides["train.log_visual_advantage"] = True
  c.study.overrides["train.log_token_gradients"] = True
  return c
