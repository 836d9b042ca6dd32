r"""python -m vaopd_jax.study --config configs/dilution.py [--config.study.seeds=1,2,3,4,5]

The dilution the paper names, on purpose: OPD against VA-OPD as the language
scaffolding around the one vision-critical token grows. The replies are
'scaffold' replies (vaopd_jax/data/synthetic.py): `data.synthetic_scaffold_tokens`
filler tokens, then "The lines form <detail>. Answer: <texture>"; the teacher
and the student warm-ups are taught partly different phrasings of the filler
(`data.synthetic_phrasing_mismatch`: the share of its sentences phrased from
disjoint halves of their variants), so on the student's rollouts the reverse KL
has mass on phrasing that has nothing to do with the image. The study runs the
grid (scaffold length x seeds x {OPD, VA-OPD}) through the real trainer, with
warm-ups per (length, seed), and writes dilution.md and dilution.png
(fine-detail accuracy at the last step and steps to `study.threshold` against
the scaffold length, mean and 95 % interval over seeds, VA-OPD minus OPD paired
by seed) beside the per-length tables and curves. docs/study.md has the
measured figures and wall time.
"""

from vaopd_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.load_sibling(__file__, "study").get_config(arg)
  c.study.workdir = "/tmp/vaopd_dilution"
  c.study.methods = ("opd", "va_opd")
  c.study.seeds = (1, 2, 3, 4, 5)      # the settings were chosen on seed 0
  c.study.sweep_field = "data.synthetic_scaffold_tokens"
  c.study.sweep_values = (4, 8, 16, 32, 48)
  c.study.overrides.update({"data.synthetic_reply_style": "scaffold", "data.synthetic_phrasing_mismatch": 1.0})
  return c
