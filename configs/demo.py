r"""python -m vaopd_jax.train --config configs/demo.py

The offline demo: no downloads, CPU, a few minutes. A tiny Qwen3-VL-shaped
teacher (2 text layers, width 128, over the task's Qwen tokens) is first taught
the synthetic vision-critical task by supervised fine-tuning (cached in
<workdir>/teacher_sft and reused by later runs), then distilled into a student
with VA-OPD. The student has the teacher's shape and is *partly sighted*, as a
small pre-trained VLM is: its vision tower starts as the teacher's (and stays
fixed in its warm-up, cached in <workdir>/student_sft), its warm-up teaches it
the colours and an auxiliary question that asks for the texture in other words
(bands / bars / checks, on the original images), but shows its fine-question
replies only PIXELATED images: it sees the texture and can say so, yet its
replies to the fine question do not use it. That mapping must come from the
teacher.

The task (vaopd_jax/data/synthetic.py): FINE questions ask for the 1-pixel
texture of the background (horizontal / vertical / grid), which 10% pixelation
averages away; COARSE questions ask for the background or the disk colour,
which survive it. Replies are 'scaffold' replies: 8 tokens of language filler,
the colours ("A white disk on red."), then "The lines form <detail>. Answer:
<texture>" (23 tokens with <|im_end|>; the detail word is the one that needs
the fine detail). Three quarters of the distillation prompts are fine
questions. The run ends with a table of student accuracy on fine and coarse
validation questions and the student's mean visual advantage, before and after
distillation, and prints where the tensorboard logs and the exported student
(Hugging Face format) are. docs/study.md has the design choices and measured
figures.

Variants: `configs/demo.py:method=opd` for the standard-OPD baseline (compare
the two tables). `--config.data.synthetic_reply_style=natural` for the longer
(24-56-token) natural replies, on which neither method teaches in this budget.
"""

import ml_collections

from vaopd_jax import config as config_lib


def get_config(arg=None):
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(arg)
  c.workdir = "/tmp/vaopd_demo"
  c.seed = 0                          # the seed the demo's figures in README were measured with (paper: 42)
  # The student stands in for a pre-trained model (docs/study.md, "the partly sighted student"): a warm-up
  # with the teacher's vision tower, kept fixed; the auxiliary texture question and the coarse ones on the
  # original images, the fine ones on pixelated images. init='random' skips the warm-up (the tests' student).
  c.student.init = "sft"
  c.student.tiny = config_lib.tiny_spec(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256, vision_depth=2,
                                        vision_hidden=64)
  c.student.sft = ml_collections.ConfigDict()
  c.student.sft.steps = 100
  c.student.sft.lr = 3e-3
  c.student.sft.batch_size = 32
  c.student.sft.image_word_weight = 10.0  # colours, fine-detail and auxiliary words weigh 10x (see the teacher's)
  c.student.sft.fine_fraction = 0.34  # fine, auxiliary and coarse questions about equally often
  c.student.sft.aux_fraction = 0.33  # the auxiliary texture question (data/synthetic.py, AUX_QUESTION)
  c.student.sft.pixelated_share = 0.0  # share of the warm-up prompts shown pixelated on top of sft.images
  c.student.sft.vision_init = "teacher"  # random | teacher: the student's vision tower starts as the SFT teacher's
  c.student.sft.train_vision = False    # the warm-up keeps it (trained at 3e-3 it lost the texture: docs/study.md)
  c.student.sft.texture_label_rate = 1.0  # share of its fine replies naming the image's texture (others: random)
  c.student.sft.images = "pixelated_fine"  # original | pixelated | pixelated_fine (only the fine questions'
                                     # images pixelated): its fine replies never learn which detail word the
                                     # texture it sees goes with
  c.student.sft.output_dir = ""      # '' = <workdir>/student_sft (reused when it holds a finished student)
  # The teacher: a tiny model taught the whole task by SFT first (init='hf' takes teacher.hf_path instead).
  c.teacher.init = "sft"
  c.teacher.sft = ml_collections.ConfigDict()
  c.teacher.sft.steps = 120
  c.teacher.sft.lr = 3e-3
  c.teacher.sft.batch_size = 32
  c.teacher.sft.image_word_weight = 10.0  # the few words of a ~40-token reply that depend on the image (colours,
                                         # fine detail) weigh 10x: unweighted, 120 steps teach the scaffolding
                                         # but not to read the texture
  c.teacher.sft.fine_fraction = 0.75  # mostly the texture: at 0.5, 120 steps taught it on 1 of 3 warm-up seeds
  c.teacher.sft.aux_fraction = 0.0
  c.teacher.sft.pixelated_share = 0.0
  c.teacher.sft.texture_label_rate = 1.0
  c.teacher.sft.images = "original"  # the teacher learns from the original images
  c.teacher.sft.output_dir = ""     # '' = <workdir>/teacher_sft (reused when it holds a finished teacher)
  c.teacher.tiny = config_lib.tiny_spec(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256, vision_depth=2,
                                        vision_hidden=64)

  c.data.source = "synthetic"
  c.data.val_source = "synthetic"
  c.data.image_size = 64              # 64x64 images -> 4x4 patches -> 4 visual tokens
  c.data.min_pixels = 1024
  c.data.max_pixels = 4096
  c.data.prompt_buckets = (32, 64)
  c.data.prompt_patch_buckets = (16, 64)  # one 64x64 image: 16 patch rows
  c.data.synthetic_train_size = 4096  # training prompts (validation: eval.num_problems others)
  c.data.synthetic_fine_fraction = 0.75  # mostly the vision-critical question; the coarse ones guard against forgetting
  # The taught replies (data/synthetic.py): 'natural' (20-60 tokens) or 'scaffold' (synthetic_scaffold_tokens of
  # filler, then a 9-token core), with a share synthetic_phrasing_mismatch of the filler's slots phrased
  # differently by the teacher's and the student's warm-ups.
  c.data.synthetic_reply_style = "scaffold"
  c.data.synthetic_scaffold_tokens = 8
  c.data.synthetic_phrasing_mismatch = 0.0

  # The tiny models' vocabulary is the task's ~130 Qwen tokens (data.tokenizer.TaskVocabTokenizer): the same
  # softmax over the task's tokens at a small fraction of the 151,936-row LM head's cost.
  c.data.task_vocabulary = True

  c.rollout.max_new_tokens = 64       # scaffold replies: scaffold tokens + 15 (<|im_end|> included); natural: 24-56
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0               # plain sampling: nucleus filtering over 151,936 logits is slow on CPU

  c.model.dtype = "float32"
  c.model.remat = "none"
  c.model.attention_impl = "xla"     # short sequences: plain attention is fastest
  c.model.kl_chunk_size = 8          # small chunks stay in the CPU cache (64 is several times slower here)

  c.optim.lr = 1.5e-3                 # a tiny student, not a 2B model
  c.optim.weight_decay = 0.0

  c.train.num_steps = 80             # seed 0: OPD reaches 1.00 fine-detail accuracy by step 50, VA-OPD 0.68 at 80
  c.train.checkpoint_every = 20
  c.train.log_every = 5

  c.eval.every = 20
  c.eval.num_problems = 64
  c.eval.temperature = 0.0            # greedy: the before/after table is not sampling noise
  c.eval.max_new_tokens = 64
  c.eval.batch_size = 32

  return c
