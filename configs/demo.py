r"""python -m vaopd_jax.train --config configs/demo.py

The offline demo: no downloads, CPU, under 10 minutes. A tiny Qwen3-VL-shaped
teacher (2 text layers, width 128, the real Qwen vocabulary and tokenizer) is
first taught the synthetic vision-critical task by supervised fine-tuning
(cached in <workdir>/teacher_sft and reused by later runs), then distilled into
a student with VA-OPD. The student has the teacher's shape; what it lacks is
the teacher's sight: its warm-up (standing in for pre-training; cached in
<workdir>/student_sft) shows it only the PIXELATED views, so it learns the
questions, the answer words and the colours, but the fine detail is not in
what it saw. (Tiny students with a smaller vision tower than the teacher's
learned the texture too slowly for a 10-minute demo.)

The task (vaopd_jax/data/synthetic.py): FINE questions ask for the 1-pixel
texture of the background (horizontal / vertical / grid), which 10% pixelation
averages away; COARSE questions ask for the background or the disk colour,
which survive it. Three quarters of the distillation prompts are fine
questions. The run ends with a table of student accuracy on fine and coarse
validation questions and the student's mean visual advantage, before and after
distillation, and prints where the tensorboard logs and the exported student
(Hugging Face format) are. README.md ("What the demo does") has measured
figures.

Variants: `configs/demo.py:method=opd` for the standard-OPD baseline (compare
the two tables). Faster: `--config.train.num_steps=20`.
"""

import ml_collections

from vaopd_jax import config as config_lib


def get_config(arg=None):
  base = config_lib.load_sibling(__file__, "base")
  c = base.get_config(arg)
  c.workdir = "/tmp/vaopd_demo"
  c.seed = 0                          # the seed the demo's figures in README were measured with (paper: 42)
  # The student stands in for a pre-trained model: a short SFT warm-up on the PIXELATED views of all
  # questions (answer format and words, colours); the fine-detail (texture) skill can only come from
  # the teacher. init='random' skips the warm-up (a random tiny student, as the tests use).
  c.student.init = "sft"
  c.student.tiny = config_lib.tiny_spec(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256, vision_depth=2,
                                        vision_hidden=64)
  c.student.sft = ml_collections.ConfigDict()
  c.student.sft.steps = 100
  c.student.sft.lr = 3e-3
  c.student.sft.batch_size = 32
  c.student.sft.image_word_weight = 10.0  # colours and fine-detail words weigh 10x (see the teacher's)
  c.student.sft.fine_fraction = 0.34  # each of the three questions about equally often
  c.student.sft.aux_fraction = 0.0  # share of the auxiliary texture question (data/synthetic.py, AUX_QUESTION)
  c.student.sft.pixelated_share = 0.0  # share of the warm-up prompts shown pixelated on top of sft.images
  c.student.sft.vision_init = "random"  # random | teacher: start the student's vision tower from the SFT teacher's
  c.student.sft.train_vision = True     # False: the warm-up leaves the vision tower as it starts
  c.student.sft.texture_label_rate = 1.0  # share of its fine replies naming the image's texture (others: random)
  c.student.sft.images = "pixelated"  # original | pixelated | pixelated_fine (only the fine-detail questions'
                                     # images pixelated). On pixelated views the student learns the questions, the
                                     # answer words and the coarse cues, but not the fine detail, which must come
                                     # from the teacher
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
  c.teacher.sft.fine_fraction = 0.5  # the whole task
  c.teacher.sft.aux_fraction = 0.0
  c.teacher.sft.pixelated_share = 0.0
  c.teacher.sft.texture_label_rate = 1.0
  c.teacher.sft.images = "original"  # the teacher learns from the original images
  c.teacher.sft.output_dir = ""     # '' = <workdir>/teacher_sft (reused when it holds a finished teacher)
  c.teacher.sft.tiny = config_lib.tiny_spec(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256, vision_depth=2,
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
  c.data.synthetic_reply_style = "natural"
  c.data.synthetic_scaffold_tokens = 0
  c.data.synthetic_phrasing_mismatch = 0.0

  # The tiny models' vocabulary is the task's ~130 Qwen tokens (data.tokenizer.TaskVocabTokenizer): the same
  # softmax over the task's tokens at a small fraction of the 151,936-row LM head's cost.
  c.data.task_vocabulary = True

  c.rollout.max_new_tokens = 64       # taught replies are 24-56 tokens (<|im_end|> included)
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0               # plain sampling: nucleus filtering over 151,936 logits is slow on CPU

  c.model.dtype = "float32"
  c.model.remat = "none"
  c.model.attention_impl = "xla"     # short sequences: plain attention is fastest
  c.model.kl_chunk_size = 8          # small chunks stay in the CPU cache (64 is several times slower here)

  c.optim.lr = 1.5e-3                 # a tiny student, not a 2B model
  c.optim.weight_decay = 0.0

  c.train.num_steps = 40
  c.train.checkpoint_every = 20
  c.train.log_every = 5

  c.eval.every = 20
  c.eval.num_problems = 64
  c.eval.temperature = 0.0            # greedy: the before/after table is not sampling noise
  c.eval.max_new_tokens = 64
  c.eval.batch_size = 32

  return c
