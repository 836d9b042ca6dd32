"""Teacher scoring: the frozen teacher's two views of the student's rollouts, and the visual advantage.

    scores = score_rollouts(teacher, batch, pixelated=True, num_micro=1, num_rollouts=4, valid_vocab_size=V)
    scores.hidden     (R, Tr, E) the teacher's final hidden states on the original view (the KL's teacher side)
    scores.logp_orig  (R, Tr) log p_T(y_t | original image, x, y_<t) of the sampled tokens
    scores.logp_pix   (R, Tr) the same with the pixelated image (zeros when pixelated=False)
    scores.va         (R, Tr) the visual advantage, Eq. 2 (zeros when pixelated=False)
    logp_orig, logp_pix = two_view_logprobs(model, batch, valid_vocab_size=V)   # any model, e.g. the student

Everything here is stop-gradient: the teacher is frozen. Log-probs come from the chunked LM head
(`distill.kl`), never (R, Tr, V) at once. With micro-batches (`num_micro` > 1) the teacher scores one
micro-batch of whole prompts at a time (`lax.scan`) and the results are joined back into batch order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vaopd_jax.distill import kl as kl_lib
from vaopd_jax.distill import microbatch
from vaopd_jax.distill import objective
from vaopd_jax.distill.batch import TrainBatch
from vaopd_jax.models.qwen3_vl import Qwen3VL


class TeacherScores(NamedTuple):
    """The teacher's view of a batch of rollouts (all (R, Tr) but `hidden`, (R, Tr, E)); see the module docstring."""

    hidden: jax.Array
    logp_orig: jax.Array
    logp_pix: jax.Array
    va: jax.Array


def response_hidden(model: Qwen3VL, batch: TrainBatch, pixel_values) -> jax.Array:
    """Final hidden states at the positions that predict the response tokens: (R, Tr, E)."""
    image_embeds = deepstack = None
    if pixel_values is not None:
        # The vision tower runs once per prompt; the rollouts of a prompt share its features by a gather.
        image_embeds, deepstack = model.encode_prompt_images(pixel_values, batch.vision_inputs, batch.image_rows)
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids,
                                 image_embeds=image_embeds, deepstack_embeds=deepstack)
    return jnp.take_along_axis(hidden, batch.response_positions[..., None], axis=1)


def lm_head(model: Qwen3VL) -> jax.Array:
    """The (E, V) LM head in the model's compute dtype: the one cast every chunked KL / log-prob here uses."""
    return model.lm_head_kernel().astype(model.compute_dtype)


def view_logprobs(model: Qwen3VL, batch: TrainBatch, pixel_values, *, valid_vocab_size: int | None = None,
                  chunk_size: int = kl_lib.DEFAULT_CHUNK_SIZE) -> jax.Array:
    """(R, Tr) float32 log-probs of the sampled response tokens with one view of the images (`pixel_values`:
    batch.pixel_values or batch.pixel_values_pixelated)."""
    return kl_lib.token_logprobs(response_hidden(model, batch, pixel_values), lm_head(model), batch.response_tokens,
                                 valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)


def two_view_logprobs(model: Qwen3VL, batch: TrainBatch, *, valid_vocab_size: int | None = None,
                      chunk_size: int = kl_lib.DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """(logp_orig, logp_pix), each (R, Tr): the two terms of the visual advantage (Eq. 2). The trainer's
    validation (the student's own VA) and the notebooks' VA views compute them here."""
    kw = dict(valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)
    return (view_logprobs(model, batch, batch.pixel_values, **kw),
            view_logprobs(model, batch, batch.pixel_values_pixelated, **kw))


def _score(teacher: Qwen3VL, batch: TrainBatch, pixelated: bool, kw: dict):
    hidden = jax.lax.stop_gradient(response_hidden(teacher, batch, batch.pixel_values))
    logp_orig = kl_lib.token_logprobs(hidden, lm_head(teacher), batch.response_tokens, **kw)
    if pixelated:
        logp_pix = jax.lax.stop_gradient(view_logprobs(teacher, batch, batch.pixel_values_pixelated, **kw))
    else:
        logp_pix = jnp.zeros_like(logp_orig)
    return hidden, logp_orig, logp_pix


def score_rollouts(teacher: Qwen3VL, batch: TrainBatch, *, pixelated: bool, num_micro: int, num_rollouts: int,
                   valid_vocab_size: int | None = None,
                   chunk_size: int = kl_lib.DEFAULT_CHUNK_SIZE) -> TeacherScores:
    """Both teacher passes over every rollout of `batch` (one micro-batch of whole prompts at a time when
    num_micro > 1), then the visual advantage. pixelated=False (standard OPD without VA logging) skips the
    pixelated pass; logp_pix and va are then zeros."""
    kw = dict(valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)
    if num_micro == 1:
        hidden, logp_orig, logp_pix = _score(teacher, batch, pixelated, kw)
    else:
        micro = microbatch.split(batch, num_micro, num_rollouts)
        _, stacked = jax.lax.scan(lambda _, mb: (None, _score(teacher, mb, pixelated, kw)), None, micro)
        hidden, logp_orig, logp_pix = (microbatch.join(x) for x in stacked)
    if pixelated:
        va = objective.visual_advantage(logp_orig, logp_pix, batch.response_mask)
    else:
        va = jnp.zeros(batch.response_mask.shape, jnp.float32)
    # The teacher's vocabulary-sized passes finish before the student's KL starts: XLA's scheduler otherwise
    # runs them side by side (on CPU, about two chunks of logits more at the peak).
    return TeacherScores(*jax.lax.optimization_barrier((hidden, logp_orig, logp_pix, va)))


def va_concentration(va, mask, tokens, critical_token_ids=(), fraction: float = 0.1) -> dict:
    """Where the VA mass of a batch of rollouts sits (the paper: the top 10 % of tokens carry ~93 % of it).

    va, mask, tokens: (R, T) per-token VA (>= 0), response mask, token ids. The top tokens are the
    ceil(fraction x n) valid tokens with the largest VA (n valid tokens; ties: earlier rows and tokens first).
    Returns scalars (0 when the VA mass is 0):
      top_share: share of the VA mass carried by the top tokens;
      top_critical_share: share of the top tokens' VA mass that sits on `critical_token_ids`;
      critical_share: share of all VA mass on `critical_token_ids`;
      critical_token_share: share of the valid tokens that are critical (the share a uniform VA would give).
    """
    valid = (mask > 0).reshape(-1)
    flat = jnp.where(valid, va.reshape(-1), 0.0)
    k = jnp.ceil(fraction * valid.sum())
    order = jnp.argsort(jnp.where(valid, -flat, jnp.inf), stable=True)
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    top = valid & (rank < k)
    critical = valid & critical_mask(tokens, critical_token_ids).reshape(-1)
    total, top_mass = flat.sum(), jnp.where(top, flat, 0.0).sum()
    return {"top_share": share(top_mass, total),
            "top_critical_share": share(jnp.where(top & critical, flat, 0.0).sum(), top_mass),
            "critical_share": share(jnp.where(critical, flat, 0.0).sum(), total),
            "critical_token_share": share(critical.sum().astype(jnp.float32), valid.sum().astype(jnp.float32))}


def critical_mask(tokens, critical_token_ids) -> jax.Array:
    """(R, T) bool: the tokens whose ids are among `critical_token_ids` (none when it is empty)."""
    return jnp.isin(tokens, jnp.asarray(tuple(critical_token_ids) or (-1,), jnp.int32))


def share(part, whole) -> jax.Array:
    """part / whole, 0 where whole is 0."""
    return jnp.where(whole > 0, part / jnp.maximum(whole, 1e-30), 0.0)
