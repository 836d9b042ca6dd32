r"""python -m vaopd_jax.train --config configs/base.py \
    --config.workdir=/tmp/vaopd_base \
    --config.student.hf_path=/ckpt/Qwen3-VL-2B-Instruct \
    --config.teacher.hf_path=/ckpt/Qwen3-VL-8B-Instruct \
    --config.data.train_path=/data/geometry3k/data \
    --config.data.val_path=/data/geometry3k/data

The paper's recipe (docs/method.md, "Defaults"): Qwen3-VL-8B -> 2B on Geometry3K with VA-OPD.

Expect 655 steps (5 epochs of 131 full batches: 2,101 prompts // 16 per step, the
release's drop_last), warm-up int(0.05 x 655) = 32 steps, 16 prompts x 4
rollouts of up to 4,096 tokens per step, validation (8 samples at temperature 1.0
on each of 200 Geometry3K validation problems: avg@8) before training and every
50 steps, the best student (by validation accuracy, the earliest on ties)
and the final student exported to <workdir>/export/{best,final} in Hugging
Face format. The paper reports ~6.5 h on 8xA100 to reach standard OPD's final
MathVerse score.

Variants: `configs/base.py:method=opd` (also va_opd, reweight_only, group_only).
Every field can be overridden, e.g. `--config.optim.lr=2e-6`. The other
config files start from this one: configs/paper.py (the paper's runs, each
naming and checking its teacher's size), configs/demo.py (the offline demo and
its demo-only fields).
"""

import ml_collections

from vaopd_jax import config as config_lib


def get_config(arg=None):
  """Returns the paper-recipe config; `arg` may set `method=...`."""
  args = config_lib.parse_arg(arg, method="va_opd")
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.seed = 42                       # the release's seed (data order, rollouts)
  c.method = args.method            # va_opd | opd | reweight_only | group_only
  c.tokenizer_path = ""             # '' = the student's HF directory, else the offline Qwen tokenizer

  c.student = ml_collections.ConfigDict()
  c.student.init = "hf"             # 'hf' (student.hf_path); configs/demo.py: 'sft' or 'random' (student.tiny)
  c.student.hf_path = ""
  c.student.size = ""               # e.g. '2b': checked against student.hf_path's config.json ('' = any)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.init = "hf"             # 'hf' (teacher.hf_path); configs/demo.py: 'sft' (a tiny teacher taught first)
  c.teacher.hf_path = ""            # frozen; loaded from here, never copied into checkpoints
  c.teacher.size = ""               # e.g. '8b': checked against teacher.hf_path's config.json ('' = any)

  # VA (Eq. 2-5): tau = 1.0, eps = 1e-6, p_v = 0.2, lambda = 0.5, pixelation ratio 0.10.
  c.va = ml_collections.ConfigDict()
  c.va.p_v = 0.2
  c.va.lam = 0.5
  c.va.tau = 1.0
  c.va.eps = 1e-6
  c.va.pixelation_ratio = 0.1

  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_rollouts = 4        # rollouts per prompt
  c.rollout.max_new_tokens = 4096
  c.rollout.temperature = 0.7
  c.rollout.top_p = 0.95
  c.rollout.top_k = 0               # no top-k

  c.data = ml_collections.ConfigDict()
  c.data.source = "geometry3k"      # geometry3k | virl39k | synthetic
  c.data.train_path = ""
  c.data.val_source = "geometry3k"  # validation: the 200-problem Geometry3K subset
  c.data.val_path = ""
  c.data.prompts_per_step = 16
  c.data.num_epochs = 5.0
  c.data.min_pixels = 262144
  c.data.max_pixels = 4194304
  c.data.image_path = "release"     # release: Pillow resize into the pixel bounds + RGB, pixelate THAT image,
                                    # then the processor (EasyR1 process_image); single_resize: pixelate the
                                    # decoded image, one smart resize per view
  c.data.prompt_buckets = (256, 512, 1024, 2048, 4096, 8192)  # the largest is the prompt limit
  c.data.prompt_patch_buckets = (1024, 2048, 4096, 8192, 16384)  # patch rows of one prompt's images (per view)
  c.data.num_workers = 0
  c.data.shuffle = True             # training records in a new random order each epoch (the release); False:
                                    # file order (compare runs over datasets that differ by skipped records)

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "bfloat16"        # params and matmuls; norms, softmax and the loss stay fp32
  c.model.remat = "block"
  c.model.kl_chunk_size = 512       # response positions per chunk of the full-vocabulary KL (distill/kl.py's
                                    # DEFAULT_CHUNK_SIZE, the reason is written there)
  c.model.attention_impl = "chunked"  # exact, no T x T scores (fits 4k responses); 'xla' | 'cudnn' (GPU)
  c.model.attention_chunk_size = 512  # queries per block of 'chunked' attention

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.warmup_fraction = 0.05    # linear warm-up over int(0.05 x steps), then cosine decay to 0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = -1            # -1: ceil(num_epochs * (train size // prompts_per_step)), full batches
  c.train.log_every = 1
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.max_nonfinite_steps = 3   # consecutive skipped steps before the run stops
  # A resume must share its checkpoint's configuration (vaopd_jax/runtime/checkpoint.py RESUME_FIELDS and the
  # models): fields listed here may differ, e.g. `--config.train.resume_across_changes=optim.lr` for a new lr.
  c.train.resume_across_changes = ()
  c.train.peak_tflops_per_device = 0.0  # 0: look up the device kind (MFU estimate)
  # Rollouts per micro-batch inside the one jitted step (0: all at once). Whole prompts: a multiple of
  # rollout.num_rollouts dividing prompts_per_step * num_rollouts. Same loss and gradient, less memory
  # (`python -m vaopd_jax.bench.step --part aot` prints what each teacher needs on 8 x 80 GB).
  c.train.micro_batch_rollouts = 0
  # Persistent XLA compilation cache: '' = $JAX_COMPILATION_CACHE_DIR, else ~/.cache/vaopd_jax/jax_compilation_cache
  # (one per machine, shared by its runs; on a multi-host slice, storage every host reads); 'none' = off.
  c.train.compilation_cache_dir = ""
  # A loop phase (data, rollout, update, validation, checkpoint) past its limit is reported with every thread's
  # Python stack; then 'report' keeps waiting, 'exit' ends the process with code 75 (restart the run).
  c.train.watchdog = ml_collections.ConfigDict()
  c.train.watchdog.timeout_s = 3600.0        # 0 = off
  c.train.watchdog.first_timeout_s = 7200.0  # the first run of each phase (it includes XLA compilation)
  c.train.watchdog.action = "report"
  # Mechanism logging: the teacher's pixelated pass and the VA metrics also for method=opd; the share of the loss's
  # gradient on the task's vision-critical tokens (one more student pass). The miniature's study turns both on.
  c.train.log_visual_advantage = False
  c.train.log_token_gradients = False

  # Validation: 200 of the 300 Geometry3K validation problems
  # (sorted(random.Random(42).sample(range(300), 200))), every 50 steps.
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 50
  c.eval.num_problems = 200
  c.eval.num_samples = 8            # avg@8, graded like the release (vaopd_jax.eval.validation)
  c.eval.temperature = 1.0
  c.eval.top_p = 1.0
  c.eval.max_new_tokens = 4096
  c.eval.batch_size = 16

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.expert = 1                 # expert parallelism: a MoE teacher's experts split over it (also FSDP for the
                                    # dense parts); configs/paper.py teacher=30b-a3b uses it
  c.mesh.tensor = 1

  c.export = ml_collections.ConfigDict()
  c.export.final = True
  c.export.best = True
  return c
