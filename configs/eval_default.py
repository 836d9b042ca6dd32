r"""python -m vaopd_jax.evaluate --config configs/eval_default.py \
    --config.model=/ckpt/Qwen3-VL-2B-Instruct \
    --config.benchmarks_dir=/data/benchmarks \
    --config.output_dir=/tmp/eval_qwen3vl_2b

The paper's evaluation (docs/data.md): WeMath, MathVista, MathVerse (math) and
HallusionBench, AI2D, MMMU, MMStar, OCRBench (visual), avg@8 at temperature 1.0,
top-p 1.0. Expect 8 samples for each of ~14,200 questions; the table printed at
the end (and written to <output_dir>/results.md) has the paper's layout with Math
avg and Visual avg, next to per-sample JSONL and summary.json.

config.model: a Hugging Face directory, or a training workdir (its
export/<config.export>/ student, 'best' by default). Each benchmark is read from
<benchmarks_dir>/<name> (a local copy of the public HF release, e.g.
`huggingface-cli download --repo-type dataset We-Math/We-Math --local-dir
/data/benchmarks/wemath`) or from config.paths.<name>.

Variants: `configs/eval_default.py:quick` (1 sample, 512 new tokens, 50 questions
per benchmark: a first look in minutes), `:greedy` (temperature 0, 1 sample).
An LLM judge (for protocols that use one) is off unless
--config.judge.url=http://host:port/v1 --config.judge.model=NAME are given; the
summary then says where the rule-based fallback was used.
"""

import ml_collections

from vaopd_jax.eval import benchmarks


def get_config(arg=None):
  """Returns the evaluation config; `arg` may be '', 'quick' or 'greedy'."""
  variant = (arg or "").strip()
  if variant not in ("", "quick", "greedy"):
    raise ValueError(f"configs/eval_default.py: unknown variant {variant!r}; use '', 'quick' or 'greedy'")
  c = ml_collections.ConfigDict()
  c.model = ""                      # HF dir, or a training workdir (export/<export>)
  c.export = "best"                 # which export of a training workdir: best | final
  c.tokenizer_path = ""             # '' = the model dir's tokenizer, else the offline Qwen tokenizer
  c.dtype = "bfloat16"              # parameter dtype: bfloat16 | float32
  c.benchmarks_dir = ""
  c.benchmarks = ",".join(benchmarks.BENCHMARKS)   # comma-separated subset
  c.paths = ml_collections.ConfigDict({name: "" for name in benchmarks.BENCHMARKS})  # per-benchmark dirs
  c.output_dir = "eval_results"

  # Sampling (docs/method.md "evaluation sampling"): temperature 1.0, top-p 1.0, avg@8.
  c.num_samples = 8
  c.temperature = 1.0
  c.top_p = 1.0
  c.top_k = 0
  c.max_new_tokens = 4096
  c.batch_size = 8                  # prompts per sampler call (x num_samples rows)
  c.min_prompt_bucket = 256         # prompts pad to powers of two >= this: few compiled programs
  c.seed = 0

  # Prompts: the model's own chat template; images prepared like training.
  c.prompt_suffix = ""              # appended to every question (none by default)
  c.min_pixels = 262_144
  c.max_pixels = 4_194_304
  c.image_path = "release"          # release: Pillow resize into the pixel bounds + RGB, then the processor
                                    # (EasyR1's process_image); single_resize: the processor's resize only
  c.max_prompt_tokens = 8192        # longer prompts are skipped and reported
  c.limit = 0                       # questions per benchmark (0 = all)

  c.grading_timeout_s = 5.0         # math-verify wall-clock limit per answer (then: wrong, logged)
  # official: each official scorer's leniency (MathVista: an unparsed multiple-choice answer -> the most
  # similar option; MMMU: -> a seeded random option; HallusionBench: "uncertain" is right on the no-figure
  # VS rows; OCRBench HME100k: spaces removed); strict: none of them. results.md says which was used.
  c.scoring = "official"
  c.mmstar_average = "rows"         # rows (VLMEvalKit) | l2_categories (lmms-eval); both are reported
  c.judge = ml_collections.ConfigDict()
  c.judge.url = ""                  # OpenAI-compatible endpoint, e.g. http://localhost:8000/v1
  c.judge.model = ""
  c.judge.api_key_env = "OPENAI_API_KEY"
  c.judge.timeout_s = 60.0

  c.mesh = ml_collections.ConfigDict()   # over this process's LOCAL devices
  c.mesh.data = -1                  # -1: every local device not used by fsdp x expert x tensor
  c.mesh.fsdp = 1
  c.mesh.expert = 1                 # a mixture-of-experts model's experts split over it (expert parallelism)
  c.mesh.tensor = 1

  if variant == "quick":
    c.num_samples = 1
    c.max_new_tokens = 512
    c.limit = 50
  elif variant == "greedy":
    c.num_samples = 1
    c.temperature = 0.0
  return c
