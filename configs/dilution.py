r"""python -m vaopd_jax.study --config configs/dilution.py [--config.study.seeds=1,2,3,4,5]

The dilution the paper names: OPD against VA-OPD as the language scaffolding
around the one vision-critical token grows. The replies are 'scaffold' replies
(vaopd_jax/data/synthetic.py): `data.synthetic_scaffold_tokens` filler tokens,
"A <disk> disk on <background>.", then "The lines form <detail>. Answer:
<texture>" (filler + 15 tokens); everything else is configs/demo.py, whose
settings were chosen on seed 0 at 8 filler tokens. The study runs the grid
(scaffold length x seeds x {OPD, VA-OPD}) through the real trainer, with
warm-ups per (length, seed), and writes dilution.md and dilution.png
(fine-detail accuracy at the last step and steps to `study.threshold` against
the scaffold length, mean and 95 % interval over seeds, VA-OPD minus OPD paired
by seed) beside the per-length tables and curves.

`data.synthetic_phrasing_mismatch` teaches the teacher's and the student's
warm-ups disjoint phrasings of that share of the filler's sentences, so the
reverse KL on the student's rollouts has mass on phrasing that has nothing to
do with the image. It is 0 here: on seed 0 a mismatch of 0.25, 0.5 or 1.0 broke
the student's replies outright (coarse accuracy fell to 0-0.5 within 10-20
steps at 16-48 filler tokens) instead of diluting the visual signal
(docs/study.md); to try one, set it in c.study.overrides below.
"""

from vaopd_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.load_sibling(__file__, "study").get_config(arg)
  c.study.workdir = "/tmp/vaopd_dilution"
  c.study.methods = ("opd", "va_opd")
  c.study.seeds = (1, 2, 3, 4, 5)      # the settings were chosen on seed 0
  c.study.sweep_field = "data.synthetic_scaffold_tokens"
  c.study.sweep_values = (4, 8, 16, 32, 48)
  c.study.overrides.update({"data.synthetic_reply_style": "scaffold", "data.synthetic_phrasing_mismatch": 0.0})
  return c
