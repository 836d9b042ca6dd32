"""Supervised warm-up of the demo's tiny teacher and student on the synthetic vision-critical task.

The demo has no downloadable teacher, so it first teaches a tiny Qwen3-VL-shaped
model the task of ``vaopd_jax.data.synthetic`` with cross-entropy on the taught
reply's tokens after each chat prompt (the record's ``reply``: a few sentences
ending ``Answer: <answer>``, then ``<|im_end|>``; records without one are taught
``Answer: <answer>``). The reply is graded by the same first-committed-answer
rule as real data (an ``Answer:`` line, ``vaopd_jax.eval.grading.extract_answer``). The student gets a shorter
warm-up standing in for pre-training: configs/demo.py makes it *partly sighted* (its vision tower starts as
the teacher's and stays fixed, ``student.sft.vision_init`` / ``train_vision``; the auxiliary texture question
on original images, the fine questions on pixelated ones). Each trained model is written once in Hugging Face
format and reused by every later run with the same output directory.

Public API::

    model = demo_model(config, "teacher", tokenizer, mesh)     # SFT once (cached), then loaded like HF models
    ids = answer_token_ids(tokenizer, "red")                    # [..., <|im_end|>]
    batch = build_sft_batch(prompt_batch, tokenizer, max_answer_tokens=8)   # a data.batch.PromptBatch
    loss, accuracy = sft_loss(model, batch)                     # CE on answer tokens
    model, history = train_sft(model, batches, steps=..., lr=...)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaopd_jax.data import splits, synthetic
from vaopd_jax.data.batch import PromptBatch
from vaopd_jax.models import load as load_lib
from vaopd_jax.models import qwen3_vl
from vaopd_jax.parallel import multihost

log = logging.getLogger(__name__)

ANSWER_TEMPLATE = "Answer: {answer}"
IM_END = "<|im_end|>"
SFT_DONE = "SFT_DONE"  # written last into a finished SFT model's directory


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of the reply ``Answer: <answer><|im_end|>`` (the end token closes the turn)."""
    ids = tokenizer.encode(ANSWER_TEMPLATE.format(answer=answer), add_special_tokens=False)
    return list(ids) + [tokenizer.convert_tokens_to_ids(IM_END)]


def reply_token_ids(tokenizer, reply: str, answer: str) -> list[int]:
    """Token ids of the taught reply: ``reply`` when the record has one (the synthetic task's replies), else
    ``Answer: <answer>``; ``<|im_end|>`` closes the turn."""
    if not reply:
        return answer_token_ids(tokenizer, answer)
    return list(tokenizer.encode(reply, add_special_tokens=False)) + [tokenizer.convert_tokens_to_ids(IM_END)]


def build_sft_batch(prompts: PromptBatch, tokenizer, max_answer_tokens: int = 8, *,
                    critical_token_ids=(), critical_weight: float = 1.0) -> dict:
    """Appends each record's reply to its prompt and lays out the supervised targets (host numpy).

    Args:
      prompts: a `data.batch.PromptBatch` (P prompts, no filler rows) whose ``pixel_values`` hold the view to
        learn from (`PromptBatch.with_view`) and whose ``reply`` (or, where it is empty, ``answer``) gives the
        reply to learn (`reply_token_ids`).
      max_answer_tokens: A, the static reply length (longer replies are an error).
      critical_token_ids, critical_weight: reply tokens with these ids (the synthetic task's fine-detail words)
        weigh ``critical_weight`` in the loss, the others 1 (`target_mask` holds the weights).
    Returns:
      input_ids / attention_mask (P, Tp + A), position_ids (3, P, Tp + A) (the prompt's MRoPE positions, then
      next position + a for reply token a), target_positions / target_ids / target_mask (P, A): the hidden
      state at ``target_positions[p, a]`` predicts ``target_ids[p, a]``; pixel_values (P, Np, 1536),
      vision_inputs (leading P) and image_rows (the PromptBatch's per-prompt image layout), or None.
    """
    prompt_ids = np.asarray(prompts.input_ids)
    lengths = prompts.prompt_lengths
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_answer_tokens
    input_ids = np.zeros((batch, total), np.int32)
    attention_mask = np.zeros((batch, total), np.int32)
    position_ids = np.zeros((3, batch, total), np.int32)
    target_positions = np.zeros((batch, max_answer_tokens), np.int32)
    target_ids = np.zeros((batch, max_answer_tokens), np.int32)
    target_mask = np.zeros((batch, max_answer_tokens), np.float32)
    for row in range(batch):
        n = int(lengths[row])
        reply = reply_token_ids(tokenizer, str(prompts.reply[row]), str(prompts.answer[row]))
        if len(reply) > max_answer_tokens:
            raise ValueError(f"the reply of {prompts.id[row]!r} needs {len(reply)} tokens; "
                             f"max_answer_tokens is {max_answer_tokens}")
        input_ids[row, :n] = prompt_ids[row, :n]
        input_ids[row, n:n + len(reply)] = reply
        attention_mask[row, :n + len(reply)] = 1
        position_ids[:, row, :n] = prompts.position_ids[:, row, :n]
        position_ids[:, row, n:n + len(reply)] = int(prompts.next_positions[row]) + np.arange(len(reply))
        # The hidden state at position p predicts the token at p + 1.
        target_positions[row, :len(reply)] = np.arange(n - 1, n - 1 + len(reply))
        target_ids[row, :len(reply)] = reply
        target_mask[row, :len(reply)] = np.where(np.isin(reply, list(critical_token_ids)), critical_weight, 1.0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "target_positions": target_positions, "target_ids": target_ids, "target_mask": target_mask,
            "pixel_values": prompts.pixel_values, "vision_inputs": prompts.vision_inputs,
            "image_rows": prompts.image_rows()}


def sft_loss(model: qwen3_vl.Qwen3VL, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over reply tokens and their greedy (argmax) accuracy, both weighted by `target_mask`.

    Only the (B, A) reply positions go through the (E, V) lm_head, never (B, T, V).
    """
    image_embeds = deepstack = None
    if batch["pixel_values"] is not None:
        image_embeds, deepstack = model.encode_prompt_images(batch["pixel_values"], batch["vision_inputs"],
                                                             batch["image_rows"])
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"],
                                 image_embeds=image_embeds, deepstack_embeds=deepstack)
    picked = jnp.take_along_axis(hidden, batch["target_positions"][..., None], axis=1)  # (B, A, E)
    logits = model.logits_from_hidden(picked)  # (B, A, V) float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["target_ids"][..., None], axis=-1)[..., 0]
    mask = batch["target_mask"]
    count = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == batch["target_ids"]).astype(jnp.float32)
    return (nll * mask).sum() / count, (correct * mask).sum() / count


def train_sft(model: qwen3_vl.Qwen3VL, batches: Iterable[dict], *, steps: int, lr: float,
              weight_decay: float = 0.0, warmup_steps: int = 10, log_every: int = 25,
              data_sharding=None, label: str = "SFT", train_vision: bool = True
              ) -> tuple[qwen3_vl.Qwen3VL, list[tuple[int, float, float]]]:
    """Trains ``model`` in place for ``steps`` AdamW steps on ``build_sft_batch`` batches.

    Args:
      batches: an iterator of ``build_sft_batch`` outputs (host numpy).
      lr: peak learning rate of a linear warm-up + cosine decay schedule.
      data_sharding: optional callable mapping a host batch to device arrays (multi-device runs).
      label: prefix of the progress lines (e.g. "teacher SFT").
      train_vision: False keeps the vision tower (``model.visual``: patch embedding, blocks, mergers) fixed.
    Returns:
      the model and [(step, loss, reply-token accuracy)] every ``log_every`` steps.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, max(steps - 1, 1)), max(steps, 2))
    trainable = nnx.Param if train_vision else nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                 optax.adamw(schedule, weight_decay=weight_decay)), wrt=trainable)

    @nnx.jit
    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, accuracy), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss, accuracy

    history = []
    iterator: Iterator[dict] = iter(batches)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        batch = next(iterator)
        if data_sharding is not None:
            batch = data_sharding(batch)
        loss, accuracy = step(model, optimizer, batch)
        if i % log_every == 0 or i == steps:
            loss, accuracy = float(loss), float(accuracy)
            history.append((i, loss, accuracy))
            if jax.process_index() == 0:
                print(f"{label} step {i}/{steps} | loss {loss:.4f} | reply-token accuracy {accuracy:.3f} | "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
    return model, history


def warmup_views(images: str, pixelated_share: float = 0.0, *, seed: int = 0):
    """The view of each warm-up prompt's image: `PromptBatch.with_view(images)`, then a random share
    `pixelated_share` of the prompts (any question) shown pixelated instead (`<role>.sft.pixelated_share`).

    Why: a teacher that has also seen pixelated views learns what the task looks like without the fine detail
    (colours and phrasing unchanged, the texture words spread over the three), so its visual advantage
    log p(y | v) - log p(y | v~) sits on the fine-detail words rather than on whatever a never-seen blur moves.
    Returns a function PromptBatch -> PromptBatch (its draws depend on `seed` and the call count only).
    """
    if not 0.0 <= pixelated_share <= 1.0:
        raise ValueError(f"sft.pixelated_share = {pixelated_share}: must be in [0, 1]")
    rng = np.random.default_rng([seed, 17])

    def views(batch: PromptBatch) -> PromptBatch:
        batch = batch.with_view(images)
        if pixelated_share <= 0.0 or batch.pixel_values is None:
            return batch
        rows = rng.random(batch.num_prompts) < pixelated_share
        return batch._replace(pixel_values=np.where(rows[:, None, None], batch.pixel_values_pixelated,
                                                    batch.pixel_values))

    return views


def teacher_dir(config) -> str:
    """Where the demo's SFT teacher is (``teacher.sft.output_dir``, default ``<workdir>/teacher_sft``)."""
    return config.teacher.sft.output_dir or os.path.join(config.workdir, "teacher_sft")


def copy_teacher_vision(student: qwen3_vl.Qwen3VL, config, mesh) -> None:
    """Sets the student's vision tower (patch embedding, blocks, mergers) to the SFT teacher's, in place
    (``student.sft.vision_init = 'teacher'``): a student whose vision already resolves the fine detail, as a
    small pre-trained VLM's encoder does, while its replies learn what its warm-up shows them."""
    path = teacher_dir(config)
    if not os.path.exists(os.path.join(path, SFT_DONE)):
        raise ValueError(f"student.sft.vision_init = 'teacher' needs the finished SFT teacher in {path}")
    teacher = load_lib.load_model(config.model, path, mesh, dtype=jnp.float32)
    theirs, ours = nnx.state(teacher.visual, nnx.Param), nnx.state(student.visual, nnx.Param)
    shapes = lambda state: jax.tree.map(lambda x: x.shape, state)  # noqa: E731
    if shapes(theirs) != shapes(ours):
        raise ValueError("student.sft.vision_init = 'teacher' needs the student's vision tower and merger shaped like "
                         "the teacher's: set student.tiny's vision fields (and text hidden size) to "
                         "teacher.tiny's")
    nnx.update(student.visual, jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), theirs))


def demo_model(config, role: str, tokenizer, mesh) -> qwen3_vl.Qwen3VL:
    """A tiny demo model taught the synthetic task by SFT once, then reloaded from its HF directory.

    config: the run's typed `config.Config`. role 'teacher': ``config.teacher.sft`` (the whole task); role
    'student': ``config.student.sft``, a warm-up standing in for pre-training (configs/demo.py: it learns the
    questions, the reply words, the colours and the auxiliary texture question, but its fine replies see only
    pixelated views, so the mapping from the texture it sees to the fine-detail words must come from
    distillation; `config.SftConfig` has the fields: aux_fraction, pixelated_share (`warmup_views`),
    texture_label_rate (`synthetic.Replies`), vision_init ('random' | 'teacher': `copy_teacher_vision`),
    train_vision). The model lands in ``<role>.sft.output_dir`` (default ``<workdir>/<role>_sft``), reused when
    finished.
    """
    node = getattr(config, role)
    out_dir = teacher_dir(config) if role == "teacher" else (node.sft.output_dir or
                                                             os.path.join(config.workdir, "student_sft"))
    # Loaded like an HF teacher / student would be: the teacher in config.model.dtype; the student's params
    # in float32 (the AdamW master copy) with config.model.dtype matmuls.
    dtype = jnp.dtype(config.model.dtype)
    dtypes = {"dtype": dtype} if role == "teacher" else {"dtype": jnp.float32, "compute_dtype": dtype}
    if os.path.exists(os.path.join(out_dir, SFT_DONE)):
        multihost.say(f"{role}: reusing the SFT {role} in {out_dir}")
        return load_lib.load_model(config.model, out_dir, mesh, **dtypes)
    model = load_lib.tiny_model(config.model, node.tiny, seed=config.seed + (1 if role == "teacher" else 0),
                                tokenizer=tokenizer)
    sft = node.sft
    if role == "student" and sft.vision_init == "teacher":
        copy_teacher_vision(model, config, mesh)
    multihost.say(f"{role}: SFT of a tiny {role} ({load_lib.count_params(model):,} params) on the synthetic task "
                  f"(fine-question share {sft.fine_fraction}, auxiliary {sft.aux_fraction}, "
                  f"{sft.images.replace('_', ' ')} images, pixelated share {sft.pixelated_share}), "
                  f"{sft.steps} steps -> {out_dir}")
    data = splits.pipeline_for(config, tokenizer, model.config, split=f"{role}_sft", batch_size=sft.batch_size)
    # Replies up to the longest a rollout may be (the synthetic task's are 24-56 tokens with <|im_end|>).
    max_reply = max(8, config.rollout.max_new_tokens)
    # The words that depend on the image (colours, fine detail) weigh sft.image_word_weight: a few tokens of a
    # ~40-token reply, they are otherwise learnt after all the scaffolding.
    critical = dict(critical_token_ids=synthetic.image_word_ids(tokenizer), critical_weight=sft.image_word_weight)
    views = warmup_views(sft.images, sft.pixelated_share, seed=config.seed)
    batches = (build_sft_batch(views(b.gather_processes()), tokenizer, max_reply, **critical) for b in data)
    model, _ = train_sft(model, batches, steps=sft.steps, lr=sft.lr, label=f"{role} SFT",
                         train_vision=sft.train_vision)
    qwen3_vl.save_hf_checkpoint(model, out_dir)
    if multihost.primary():
        tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, SFT_DONE), "w") as f:
            f.write("ok\n")
    multihost.sync(f"{role}_sft_saved")
    return load_lib.load_model(config.model, out_dir, mesh, **dtypes)
