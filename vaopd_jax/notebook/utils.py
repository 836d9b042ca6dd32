"""Small glue for the notebooks (notebooks/quickstart.ipynb, notebooks/real_checkpoints.ipynb).

Everything here calls the package's real entry points; nothing re-implements them:

- ``find_config`` / ``train_command`` / ``run_trainer``: run the real trainer
  (``python -m vaopd_jax.train --config configs/demo.py[:method=...]``) as a
  subprocess, streaming its console output into the notebook.
- ``validation_history`` / ``comparison_rows`` / ``comparison_markdown``: the
  before/after validation table of several runs (OPD vs VA-OPD) read back from
  each run's ``metrics.jsonl``.
- ``make_records`` / ``score_visual_advantage``: the student samples answers to a
  few (image, question) pairs (``rollout.sampler.generate``), the frozen teacher
  scores them on the original and the pixelated image (the train step's
  chunked log-prob path), and the per-token visual advantage (Eq. 2,
  ``objective.visual_advantage``) comes back per rollout, ready for
  ``diagnostics.va_token_html`` / ``plot_concentration``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.data import pipeline, processor
from vaopd_jax.data import tokenizer as tokenizer_lib
from vaopd_jax.data.batch import PromptBatch
from vaopd_jax.distill import kl as kl_lib
from vaopd_jax.distill import objective
from vaopd_jax.distill import batch as batch_lib
from vaopd_jax.distill import teacher as teacher_lib
from vaopd_jax.models import qwen3_vl
from vaopd_jax.notebook import diagnostics
from vaopd_jax.rollout import sampler

# ----------------------------------------------------------------------------- running the trainer


def find_config(name: str = "demo.py", search_from: str | os.PathLike | None = None) -> str:
    """Absolute path of ``configs/<name>`` of a source checkout.

    Looks in ``$VAOPD_CONFIGS`` (a configs directory), then ``configs/`` in
    `search_from` (default: the current directory) and each of its parents, then
    beside the installed package (an editable install or a source checkout). A
    plain ``pip install git+...`` ships only the package, not ``configs/``:
    clone the repository then.

    Raises:
      FileNotFoundError: naming every place looked at.
    """
    candidates = []
    if os.environ.get("VAOPD_CONFIGS"):
        candidates.append(os.path.join(os.environ["VAOPD_CONFIGS"], name))
    here = os.path.abspath(search_from or os.getcwd())
    while True:
        candidates.append(os.path.join(here, "configs", name))
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # vaopd_jax/notebook/
    candidates.append(os.path.join(package_parent, "configs", name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"config file configs/{name} not found; looked at {candidates}. Run from a clone of the repository "
        "(git clone ... && cd vaopd_jax) or set VAOPD_CONFIGS to its configs/ directory.")


def _override_value(value: Any) -> str:
    """A config override value as absl/ml_collections parse it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def train_command(config_file: str, workdir: str, *, method: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> list[str]:
    """The argv of ``python -m vaopd_jax.train`` for one run.

    Args:
      config_file: e.g. ``find_config("demo.py")``.
      workdir: the run directory (``--config.workdir``).
      method: ``va_opd`` | ``opd`` | ``reweight_only`` | ``group_only``, passed as
        the config argument ``<file>:method=<method>``; None keeps the file's default.
      overrides: dotted config field -> value, e.g. ``{"train.num_steps": 20}``.
    """
    config_arg = config_file if method is None else f"{config_file}:method={method}"
    argv = [sys.executable, "-m", "vaopd_jax.train", f"--config={config_arg}", f"--config.workdir={workdir}"]
    for field, value in (overrides or {}).items():
        argv.append(f"--config.{field}={_override_value(value)}")
    return argv


def run_trainer(config_file: str, workdir: str, *, method: str | None = None,
                overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                echo: bool = True, keep_lines: int = 60) -> list[str]:
    """Runs the trainer in a subprocess, printing its output as it comes; returns the output lines.

    A subprocess keeps the notebook's own JAX state (devices, compiled
    programs, absl flags) apart from the trainer's, exactly as on the command line.

    Args:
      config_file, workdir, method, overrides: as in `train_command`.
      env: extra environment variables (e.g. ``JAX_COMPILATION_CACHE_DIR``, so a
        second run reuses the first run's compiled programs).
      echo: print each line as it arrives.
      keep_lines: how many trailing lines a failure message shows.

    Raises:
      RuntimeError: the trainer exited non-zero; the message holds the command and its last lines.
    """
    argv = train_command(config_file, workdir, method=method, overrides=overrides)
    full_env = dict(os.environ)
    full_env.update(env or {})
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=keep_lines)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env=full_env) as process:
        for line in process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            if echo:
                print(line, flush=True)
        returncode = process.wait()
    if returncode != 0:
        raise RuntimeError(f"trainer exited with code {returncode}: {' '.join(argv)}\n--- last lines ---\n"
                           + "\n".join(tail))
    return lines


# ----------------------------------------------------------------------------- comparing runs

# (column title, metrics.jsonl key) of the comparison table, in order.
COMPARISON_COLUMNS = (
    ("fine accuracy", "val/accuracy_fine"),
    ("coarse accuracy", "val/accuracy_coarse"),
    ("accuracy", "val/accuracy"),
    ("mean student VA", "val/student_va_mean"),
)


def validation_history(workdir: str) -> list[dict]:
    """The validation records of a run's ``metrics.jsonl`` in step order.

    Raises:
      FileNotFoundError: the run wrote no ``metrics.jsonl`` (it did not start).
      ValueError: the run has no validation record (``eval.every`` was 0).
    """
    from vaopd_jax.runtime import metrics as metrics_lib

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: did the run in {workdir} start?")
    records = sorted(metrics_lib.read_jsonl(path, kind="val"), key=lambda record: record["step"])
    if not records:
        raise ValueError(f"{path} holds no validation record; run with --config.eval.every > 0")
    return records


def comparison_rows(runs: Mapping[str, str]) -> list[dict]:
    """One row per run and moment (before / after training) for the comparison table.

    Args:
      runs: run name (e.g. "OPD", "VA-OPD") -> workdir.

    Returns:
      [{"run", "when" ("before"|"after"), "step", <column title>: float (NaN if not logged)}, ...],
      first the "before" row of the first run (step 0: every run starts from the
      same student, so one row stands for all), then each run's "after" row.
    """
    if not runs:
        raise ValueError("runs is empty; pass {run name: workdir}")
    rows = []
    for index, (name, workdir) in enumerate(runs.items()):
        history = validation_history(workdir)
        moments = [("before", history[0]), ("after", history[-1])] if index == 0 else [("after", history[-1])]
        for when, record in moments:
            row = {"run": "student at start" if when == "before" else name, "when": when,
                   "step": int(record["step"])}
            for title, key in COMPARISON_COLUMNS:
                row[title] = float(record.get(key, "nan"))  # metrics.jsonl writes NaN as the string "nan"
            rows.append(row)
    return rows


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """`comparison_rows` as a Markdown table (``IPython.display.Markdown``)."""
    titles = [title for title, _ in COMPARISON_COLUMNS]
    lines = ["| run | step | " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * len(titles)]
    for row in rows:
        cells = [f"{row[title]:.3f}" if np.isfinite(row[title]) else "–" for title in titles]
        lines.append(f"| {row['run']} | {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- VA of a student's answers


@dataclasses.dataclass
class ScoredRollout:
    """One sampled answer with the teacher's visual advantage on each of its tokens.

    tokens / mask / logp_orig / logp_pix / va: (T,) for T = max_new_tokens
    (mask 1 on the response, up to and including its end token); token_texts:
    T display strings (``diagnostics.token_texts``); text: the decoded answer
    without special tokens.
    """

    record_id: str
    question: str
    answer: str
    text: str
    tokens: np.ndarray
    mask: np.ndarray
    token_texts: list[str]
    logp_orig: np.ndarray
    logp_pix: np.ndarray
    va: np.ndarray

    def html(self, vmax: float | None = None) -> str:
        """``diagnostics.va_token_html`` of this answer."""
        return diagnostics.va_token_html(self.token_texts, self.va, self.mask, vmax=vmax)


def make_records(images: Sequence[Any], questions: Sequence[str] | str, answers: Sequence[str] | None = None,
                 ids: Sequence[str] | None = None) -> list[dict]:
    """Raw records (the data pipeline's format) from images and questions.

    Args:
      images: PIL images, uint8 (H, W, 3) arrays, or image file paths.
      questions: one per image, or one string for all; ``<image>`` marks where
        the image goes (default: before the text).
      answers: optional gold answers (shown only), default "".
      ids: optional record ids, default "image-<i>".
    """
    if isinstance(questions, str):
        questions = [questions] * len(images)
    if len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
    if answers is not None and len(answers) != len(images):
        raise ValueError(f"{len(images)} images but {len(answers)} answers")
    records = []
    for index, (image, question) in enumerate(zip(images, questions)):
        if isinstance(image, np.ndarray):
            image = processor.to_pil(image)
        records.append({"id": ids[index] if ids is not None else f"image-{index}", "images": [image],
                        "question": question, "answer": "" if answers is None else str(answers[index])})
    return records


# Patch-row buckets of one prompt's images in the notebooks' prompt batches: images of up to ~16 M pixels.
PATCH_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)


def _featurize(records: Sequence[dict], tokenizer, model_config, *, pixelation_ratio: float, min_pixels: int,
               max_pixels: int, max_prompt_tokens: int, image_path: str = "release") -> PromptBatch:
    """One collated prompt batch (both views) of `records` through the data pipeline's own featurizer."""
    # Powers of two up to the limit: the teacher pass runs over the padded prompt, so padding every
    # prompt to the limit would cost (limit / prompt length) times the work.
    prompt_buckets = tuple(1 << k for k in range(5, max_prompt_tokens.bit_length()) if 1 << k < max_prompt_tokens)
    config = pipeline.PipelineConfig(batch_size=len(records), shuffle=False, num_epochs=1, drop_remainder=False,
                                     prompt_buckets=prompt_buckets + (max_prompt_tokens,),
                                     prompt_patch_buckets=PATCH_BUCKETS,
                                     min_pixels=min_pixels, max_pixels=max_pixels, pixelation_ratio=pixelation_ratio,
                                     image_path=image_path, shard_index=0, shard_count=1)
    config.validate()
    featurize = pipeline.Featurize(config, tokenizer=tokenizer)
    examples = []
    for record in records:
        # The gold answer is only shown here; the pipeline skips training records without one.
        example = featurize({**record, "answer": record.get("answer") or "(no gold answer)"})
        if "skip" in example:
            raise ValueError(f"record {example['id']!r} cannot be used: {example['skip']} {example['detail']}")
        examples.append(example)
    return pipeline.collate(examples, config, tokenizer.pad_token_id, model_config)


@functools.partial(jax.jit, static_argnames=("chunk_size", "valid_vocab_size"))
def _teacher_logprobs(teacher_params, batch: batch_lib.TrainBatch, teacher_graphdef, chunk_size: int,
                      valid_vocab_size: int):
    """Teacher log-probs of the response tokens on the original and the pixelated view, each (R, T): the train
    step's own chunked path (`step.two_view_logprobs`), never (R, T, V) at once."""
    return teacher_lib.two_view_logprobs(nnx.merge(teacher_graphdef, teacher_params), batch,
                                      valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)


def score_visual_advantage(student: qwen3_vl.Qwen3VL, teacher: qwen3_vl.Qwen3VL, tokenizer,
                           records: Sequence[dict], *, max_new_tokens: int = 64, num_samples: int = 1,
                           temperature: float = 0.0, top_p: float = 1.0, pixelation_ratio: float = 0.1,
                           min_pixels: int = processor.MIN_PIXELS, max_pixels: int = processor.MAX_PIXELS,
                           max_prompt_tokens: int = 4096, batch_size: int = 4, seed: int = 0,
                           chunk_size: int = kl_lib.DEFAULT_CHUNK_SIZE, image_path: str = "release") -> list[ScoredRollout]:
    """The student answers each record; the teacher's VA (Eq. 2) of every answer token.

    For each record the student samples `num_samples` answers (greedy at
    temperature 0); the teacher scores each answer on the original image and
    on its pixelated copy (``processor.image_views(image, pixelation_ratio, min_pixels, max_pixels,
    image_path)``: by default the release's path, bounds resize + RGB, then pixelation), and
    VA = max(0, log p_T(y_t | v, x, y_<t) - log p_T(y_t | v~, x, y_<t)).

    Args:
      student, teacher: Qwen3VL models sharing the vocabulary and the vision patch layout.
      tokenizer: the Qwen3-VL tokenizer (``tokenizer.load_tokenizer(path_or_None)``).
      records: ``make_records(...)`` output (or synthetic / pipeline records).
      max_new_tokens: T, the answer length limit.
      batch_size: prompts per sampler / teacher call (every call has this many rows, so the
        sampler and the teacher compile once).

    Returns:
      len(records) * num_samples ScoredRollout, the samples of one record adjacent.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if student.config.text.vocab_size != teacher.config.text.vocab_size:
        raise ValueError(f"student vocab_size {student.config.text.vocab_size} != teacher vocab_size "
                         f"{teacher.config.text.vocab_size}: VA needs the teacher to score the student's tokens")
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    valid_vocab_size = tokenizer_lib.valid_vocab_size(tokenizer, student.config.text.vocab_size)
    rollouts, student_params = sampler.Sampler.for_model(
        student, max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature, top_p=top_p,
        valid_vocab_size=valid_vocab_size, eos_token_ids=tokenizer_lib.end_token_ids(tokenizer))
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
    scored: list[ScoredRollout] = []
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        # A short last chunk is filled up with copies of its last record (their rows are dropped below)
        # so every call has the same shapes and compiles once.
        filled = chunk + [chunk[-1]] * (min(batch_size, len(records)) - len(chunk))
        batch = _featurize(filled, tokenizer, student.config, pixelation_ratio=pixelation_ratio, min_pixels=min_pixels,
                           max_pixels=max_pixels, max_prompt_tokens=max_prompt_tokens, image_path=image_path)
        out = rollouts(student_params, batch, jax.random.fold_in(jax.random.key(seed), start))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
        train_batch = batch_lib.build_train_batch(batch, tokens, mask, num_samples, teacher.config)
        logp_orig, logp_pix = _teacher_logprobs(teacher_params, jax.tree.map(jnp.asarray, train_batch),
                                                teacher_graphdef, chunk_size=min(chunk_size, tokens.shape[1]),
                                                valid_vocab_size=valid_vocab_size)
        score_mask = np.asarray(train_batch.response_mask)
        va = np.asarray(objective.visual_advantage(logp_orig, logp_pix, jnp.asarray(score_mask)))
        logp_orig, logp_pix = np.asarray(logp_orig), np.asarray(logp_pix)
        for row in range(len(chunk) * num_samples):
            record = chunk[row // num_samples]
            valid = score_mask[row] > 0
            scored.append(ScoredRollout(
                record_id=str(record.get("id", "")), question=str(record["question"]),
                answer=str(record.get("answer", "")),
                text=tokenizer.decode(tokens[row][valid].tolist(), skip_special_tokens=True),
                tokens=tokens[row], mask=score_mask[row], token_texts=diagnostics.token_texts(decode, tokens[row]),
                logp_orig=np.where(valid, logp_orig[row], 0.0), logp_pix=np.where(valid, logp_pix[row], 0.0),
                va=np.where(valid, va[row], 0.0)))
    return scored
