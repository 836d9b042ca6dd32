"""Supervised warm-up of a tiny teacher on the synthetic vision-critical task (the offline demo).

The demo has no downloadable teacher, so it first teaches a tiny Qwen3-VL-shaped
model the task of ``vaopd_jax.data.synthetic`` with cross-entropy on the answer
tokens ``"Answer: <answer><|im_end|>"`` after each chat prompt. That reply form
is graded by the same first-committed-answer rule as real data (an ``Answer:``
line, ``vaopd_jax.eval.grading.extract_answer``). The trained teacher is written once
in Hugging Face format and reused by every later run with the same workdir.

Public API::

    ids = answer_token_ids(tokenizer, "red")                    # [..., <|im_end|>]
    batch = build_sft_batch(prompt_batch, tokenizer, model_cfg, max_answer_tokens=8)
    loss, accuracy = sft_loss(model, batch)                     # CE on answer tokens
    model, history = train_sft(model, batches, steps=..., lr=...)
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaopd_jax.models import qwen3_vl

log = logging.getLogger(__name__)

ANSWER_TEMPLATE = "Answer: {answer}"
IM_END = "<|im_end|>"


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of the reply ``Answer: <answer><|im_end|>`` (the end token closes the turn)."""
    ids = tokenizer.encode(ANSWER_TEMPLATE.format(answer=answer), add_special_tokens=False)
    return list(ids) + [tokenizer.convert_tokens_to_ids(IM_END)]


def build_sft_batch(prompt_batch: dict, tokenizer, model_cfg: qwen3_vl.Qwen3VLConfig,
                    max_answer_tokens: int = 8) -> dict:
    """Appends each record's reply to its prompt and lays out the supervised targets (host numpy).

    Args:
      prompt_batch: a data-pipeline batch: ``input_ids`` (B, Tp) right-padded,
        ``attention_mask`` (B, Tp), ``pixel_values`` (N, 1536), ``image_grid_thw``
        (M, 3) zero-padded with ``num_images``, ``answer`` (B,) strings.
      max_answer_tokens: A, the static reply length (longer replies are an error).
    Returns:
      input_ids / attention_mask (B, Tp + A), position_ids (3, B, Tp + A),
      target_positions / target_ids / target_mask (B, A): hidden state at
      ``target_positions[b, a]`` predicts ``target_ids[b, a]``; pixel_values
      (N, 1536); vision_inputs (``qwen3_vl.VisionInputs``).
    """
    prompt_ids = np.asarray(prompt_batch["input_ids"])
    prompt_mask = np.asarray(prompt_batch["attention_mask"]).astype(bool)
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_answer_tokens
    input_ids = np.zeros((batch, total), np.int32)
    attention_mask = np.zeros((batch, total), np.int32)
    target_positions = np.zeros((batch, max_answer_tokens), np.int32)
    target_ids = np.zeros((batch, max_answer_tokens), np.int32)
    target_mask = np.zeros((batch, max_answer_tokens), np.float32)
    for row in range(batch):
        n = int(prompt_mask[row].sum())
        reply = answer_token_ids(tokenizer, str(prompt_batch["answer"][row]))
        if len(reply) > max_answer_tokens:
            raise ValueError(f"answer {prompt_batch['answer'][row]!r} needs {len(reply)} tokens; "
                             f"max_answer_tokens is {max_answer_tokens}")
        input_ids[row, :n] = prompt_ids[row, :n]
        input_ids[row, n:n + len(reply)] = reply
        attention_mask[row, :n + len(reply)] = 1
        # The hidden state at position p predicts the token at p + 1.
        target_positions[row, :len(reply)] = np.arange(n - 1, n - 1 + len(reply))
        target_ids[row, :len(reply)] = reply
        target_mask[row, :len(reply)] = 1.0
    num_images = int(np.asarray(prompt_batch.get("num_images", len(prompt_batch["image_grid_thw"]))))
    grids = np.asarray(prompt_batch["image_grid_thw"])[:num_images]
    position_ids, _ = qwen3_vl.get_rope_index(input_ids, grids, attention_mask, model_cfg)
    pixel_values = np.asarray(prompt_batch["pixel_values"], np.float32)
    vision_inputs = qwen3_vl.prepare_vision_inputs(grids, model_cfg, pad_patches_to=pixel_values.shape[0])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "target_positions": target_positions, "target_ids": target_ids, "target_mask": target_mask,
            "pixel_values": pixel_values, "vision_inputs": vision_inputs}


def sft_loss(model: qwen3_vl.Qwen3VL, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over reply tokens and their greedy (argmax) accuracy.

    Only the (B, A) reply positions go through the (E, V) lm_head, never (B, T, V).
    """
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                 position_ids=batch["position_ids"], vision_inputs=batch["vision_inputs"])
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
              data_sharding=None, label: str = "SFT"
              ) -> tuple[qwen3_vl.Qwen3VL, list[tuple[int, float, float]]]:
    """Trains ``model`` in place for ``steps`` AdamW steps on ``build_sft_batch`` batches.

    Args:
      batches: an iterator of ``build_sft_batch`` outputs (host numpy).
      lr: peak learning rate of a linear warm-up + cosine decay schedule.
      data_sharding: optional callable mapping a host batch to device arrays (multi-device runs).
      label: prefix of the progress lines (e.g. "teacher SFT").
    Returns:
      the model and [(step, loss, reply-token accuracy)] every ``log_every`` steps.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, max(steps - 1, 1)), max(steps, 2))
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                 optax.adamw(schedule, weight_decay=weight_decay)), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        (loss, accuracy), grads = nnx.value_and_grad(sft_loss, has_aux=True)(model, batch)
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
