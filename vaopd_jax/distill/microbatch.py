"""Micro-batches of whole prompts inside the one jitted train step (`train.micro_batch_rollouts`).

Why whole prompts: the VA-OPD loss couples the rollouts of a prompt (rollout weights are a softmax over the
siblings, Eq. 3-4), and the vision tower runs once per prompt for its rollouts. The step therefore scores
every micro-batch with the teacher first, computes VA, weights and token coefficients for all rollouts, and
only then runs the student's forward and backward micro-batch by micro-batch. The loss is linear in the
per-token KL (`objective.weighted_loss`: sum(c * KL) / num_prompts with stop-gradient c and a batch-wide
num_prompts), so the sum of the micro-batches' losses and gradients is the whole batch's, up to the order of
the fp32 additions: micro-batching is gradient accumulation around the one loss function (`accumulate`).

    micro = split(batch, num_micro, num_rollouts)     # TrainBatch with a leading (M,) axis, inside the jit
    jax.lax.scan(body, carry, micro)                  # body sees one micro-batch: a TrainBatch of mb rows
    x = join(x_stacked)                               # (M, mb, ...) -> (R, ...)
    (loss, aux), grads = accumulate(loss_fn, params, xs, num_micro)   # sum over micro-batches, one gradient
"""

from __future__ import annotations

from typing import Callable

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
            f"micro_batch_rollouts={micro_batch_rollouts} must be a multiple of num_rollouts={num_rollouts} "
            f"(whole prompts: the rollout weights couple a prompt's rollouts) and divide the batch's "
            f"{num_rows} rollouts")
    return num_rows // micro_batch_rollouts


def image_rows(merged_valid: jax.Array, num_rollouts: int) -> jax.Array:
    """Feature rows of the <|image_pad|> tokens of num_rollouts adjacent copies of each prompt, (P * num_rollouts
    * Mp,) int32.

    merged_valid (P, Mp) bool: the first n_p rows of prompt p's merged features are real (`VisionInputs`).
    The same layout as `PromptBatch.image_rows(num_rollouts)` (row p * Mp + i is feature i of prompt p, listed in the
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


def stack(x, num_micro: int, axis: int = 0):
    """Splits `axis` (R or P) of an array into (M, R / M) and moves M to the front (micro-batch m holds rows
    [m * R / M, (m + 1) * R / M)); the per-micro-batch axis stays batch-sharded. None stays None."""
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
    their rollouts each (q = P / M), with its own `image_rows` into its own prompts' features.

    position_ids becomes (M, 3, mb, T); num_truncated (M,) carries the batch total in micro-batch 0, zeros
    elsewhere (only metrics read it).
    """
    vision = None
    rows = None
    if batch.vision_inputs is not None:
        vision = VisionInputs(*(stack(f, num_micro) for f in batch.vision_inputs))
        rows = jax.vmap(lambda valid: image_rows(valid, num_rollouts))(vision.merged_valid)
    truncated = jnp.zeros((num_micro,), batch.num_truncated.dtype).at[0].set(batch.num_truncated)
    return TrainBatch(
        input_ids=stack(batch.input_ids, num_micro), attention_mask=stack(batch.attention_mask, num_micro),
        position_ids=stack(batch.position_ids, num_micro, axis=1),
        response_positions=stack(batch.response_positions, num_micro),
        response_tokens=stack(batch.response_tokens, num_micro),
        response_mask=stack(batch.response_mask, num_micro),
        sampler_logprobs=stack(batch.sampler_logprobs, num_micro),
        pixel_values=stack(batch.pixel_values, num_micro),
        pixel_values_pixelated=stack(batch.pixel_values_pixelated, num_micro), vision_inputs=vision,
        image_rows=rows, num_truncated=truncated)


def join(x: jax.Array) -> jax.Array:
    """(M, mb, ...) stacked per-micro-batch outputs -> (M * mb, ...) in batch row order."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def accumulate(loss_fn: Callable, params, xs, num_micro: int):
    """((loss, aux), grads) of sum over micro-batches m of loss_fn(params, xs_m): `value_and_grad` of the one
    loss function, once (num_micro = 1: `xs` is the whole batch) or scanned over the leading (M,) axis of `xs`
    with the gradients summed in float32 (then cast back to the params' dtypes); aux is joined back into batch
    order. loss_fn(params, x) -> (scalar loss, aux pytree of (rows, ...) arrays)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        return grad_fn(params, xs)

    def body(carry, x):
        grad_sum, loss_sum = carry
        (loss, aux), grads = grad_fn(params, x)
        grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
        return (grad_sum, loss_sum + loss), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, loss), aux = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), xs)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (loss, jax.tree.map(join, aux)), grads
