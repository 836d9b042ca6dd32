"""Micro-batches of whole prompts inside the one jitted train step (`train.micro_batch_rollouts`).

Why whole prompts: the VA-OPD loss couples the K rollouts of a prompt (rollout weights are a softmax over the
siblings, Eq. 3-4), and the vision tower runs once per prompt for its K rollouts. The step therefore scores
every micro-batch with the teacher first, computes VA, weights and token coefficients for all rollouts, and
only then runs the student's forward and backward micro-batch by micro-batch. The loss is linear in the
per-token KL (`objective.weighted_loss`: sum(c * KL) / num_prompts with stop-gradient c and a batch-wide
num_prompts), so the sum of the micro-batches' losses and gradients is the whole batch's, up to the order of
the fp32 additions.

    micro = split(batch, num_micro, num_rollouts)     # TrainBatch with a leading (M,) axis, inside the jit
    jax.lax.scan(body, carry, micro)                  # body sees one micro-batch: a TrainBatch of mb rows
    x = join(x_stacked)                               # (M, mb, ...) -> (R, ...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vaopd_jax.distill.batch import TrainBatch
from vaopd_jax.models.qwen3_vl import VisionInputs
from vaopd_jax.models.qwen3_vl.sharding import constrain


def num_micro_batches(num_rows: int, micro_batch_rollouts: int | None, num_rollouts: int) -> int:
    """M = R / micro_batch_rollouts, checked: a micro-batch holds whole prompts and divides the batch.

    micro_batch_rollouts: rollouts (rows) per micro-batch; None or 0 = all rows at once (M = 1).
    """
    if not micro_batch_rollouts or micro_batch_rollouts >= num_rows:
        return 1
    if micro_batch_rollouts % num_rollouts or num_rows % micro_batch_rollouts:
        raise ValueError(
            f"micro_batch_rollouts={micro_batch_rollouts} must be a multiple of num_rollouts K={num_rollouts} "
            f"(whole prompts: the rollout weights couple a prompt's K rollouts) and divide the batch's "
            f"{num_rows} rollouts")
    return num_rows // micro_batch_rollouts


def image_rows(merged_valid: jax.Array, num_rollouts: int) -> jax.Array:
    """Feature rows of the <|image_pad|> tokens of K adjacent copies of each prompt, (P * K * Mp,) int32.

    merged_valid (P, Mp) bool: the first n_p rows of prompt p's merged features are real (`VisionInputs`).
    The same layout as `PromptBatch.image_rows(K)` (row p * Mp + i is feature i of prompt p, listed in the
    row-major order of the rows' <|image_pad|> tokens, then zeros), built inside the jit for a micro-batch.
    """
    num_prompts, per_prompt = merged_valid.shape
    rows = num_prompts * num_rollouts
    counts = jnp.repeat(merged_valid.astype(jnp.int32).sum(-1), num_rollouts)  # (rows,) image tokens per row
    offsets = jnp.cumsum(counts) - counts
    slot = jnp.arange(per_prompt, dtype=jnp.int32)
    prompt = jnp.repeat(jnp.arange(num_prompts, dtype=jnp.int32), num_rollouts)
    target = jnp.where(slot[None] < counts[:, None], offsets[:, None] + slot[None], rows * per_prompt)
    values = prompt[:, None] * per_prompt + slot[None]
    out = jnp.zeros(rows * per_prompt + 1, jnp.int32).at[target.reshape(-1)].set(values.reshape(-1))
    return out[:-1]


def _rows_first(x, num_micro: int, axis: int = 0):
    """Splits `axis` (R or P) into (M, R / M) and moves M to the front; the per-micro-batch axis stays batch-sharded."""
    if x is None:
        return None
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])
    x = jnp.moveaxis(x, 1, axis + 1)
    axes = [None] * x.ndim
    axes[axis + 1] = "batch"
    return constrain(x, axes)


def split(batch: TrainBatch, num_micro: int, num_rollouts: int) -> TrainBatch:
    """A TrainBatch whose every array has a leading (M,) axis: micro-batch m holds prompts [m*q, (m+1)*q) and
    their K rollouts each (q = P / M), with its own `image_rows` into its own prompts' features.

    position_ids becomes (M, 3, mb, T); num_truncated (M,) carries the batch total in micro-batch 0, zeros
    elsewhere (only metrics read it).
    """
    vision = None
    rows = None
    if batch.vision_inputs is not None:
        vision = VisionInputs(*(_rows_first(f, num_micro) for f in batch.vision_inputs))
        rows = jax.vmap(lambda valid: image_rows(valid, num_rollouts))(vision.merged_valid)
    truncated = jnp.zeros((num_micro,), batch.num_truncated.dtype).at[0].set(batch.num_truncated)
    return TrainBatch(
        input_ids=_rows_first(batch.input_ids, num_micro), attention_mask=_rows_first(batch.attention_mask, num_micro),
        position_ids=_rows_first(batch.position_ids, num_micro, axis=1),
        response_positions=_rows_first(batch.response_positions, num_micro),
        response_tokens=_rows_first(batch.response_tokens, num_micro),
        response_mask=_rows_first(batch.response_mask, num_micro),
        sampler_logprobs=_rows_first(batch.sampler_logprobs, num_micro),
        pixel_values=_rows_first(batch.pixel_values, num_micro),
        pixel_values_pixelated=_rows_first(batch.pixel_values_pixelated, num_micro), vision_inputs=vision,
        image_rows=rows, num_truncated=truncated)


def join(x: jax.Array) -> jax.Array:
    """(M, mb, ...) stacked per-micro-batch outputs -> (M * mb, ...) in batch row order."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
