"""`TrainBatch`: the device-ready inputs of one train step, its host-side builder and its placement on a mesh.

    train_batch = build_train_batch(prompt_batch, rollout_tokens, response_mask, num_rollouts, model_config)
    device_batch = shard_batch(train_batch, mesh)      # rows / prompts over the batch mesh axes

Layout (R = P prompts * num_rollouts, the rollouts of a prompt on adjacent rows):
each row is the prompt's real tokens followed by the rollout's response tokens,
right-padded to a static length T (``seq_len``, default Tp + Tr). The hidden
state at ``response_positions[r, j]`` (= prompt length - 1 + j) predicts
response token j, so every per-token array of the loss is (R, Tr), in the
sampler's own layout.

MRoPE positions: the prompt's positions from the PromptBatch (computed once by
the pipeline); response token j gets max_prompt_position + 1 + j on all three
axes (the position a single-prompt KV-cache decode gives it: cache position +
rope_delta).

Images: the vision tower runs once per prompt per view. The PromptBatch already
holds each prompt's patch rows padded to a static ``Np`` (a multiple of merge^2),
pixel arrays (P, Np, 1536) and per-prompt ``VisionInputs`` stacked on a leading P
axis; the train batch takes them as they are. The merged features (P, Mp, E),
Mp = Np / merge^2, are handed to the rollouts of each prompt by one index
gather, ``image_rows`` (R * Mp,) (``PromptBatch.image_rows(num_rollouts)``), listing feature
rows in the row-major order of the <|image_pad|> tokens of ``input_ids``.

Response tokens equal to <|image_pad|> / <|video_pad|> (a degenerate sample) are
never fed as inputs: the row is cut right before such a token, which itself stays
a target (the KL at its position is well defined) and everything after it leaves
the response mask. ``num_truncated`` counts these rows (project choice; the
sampler embeds such a token as text, which the image scatter of the forward
cannot reproduce).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vaopd_jax.data.batch import PromptBatch
from vaopd_jax.models.qwen3_vl import Qwen3VLConfig, VisionInputs
from vaopd_jax.models.qwen3_vl import sharding as model_sharding


class TrainBatch(NamedTuple):
    """Inputs of `train_step`. Shapes: R rows, T sequence, Tr response, P prompts, Np patches per prompt.

    input_ids (R, T) int32; attention_mask (R, T) int32; position_ids (3, R, T) int32;
    response_positions (R, Tr) int32; response_tokens (R, Tr) int32; response_mask (R, Tr) float32;
    sampler_logprobs (R, Tr) float32 (the sampler's log-probs of its tokens; zeros if unknown);
    pixel_values, pixel_values_pixelated (P, Np, patch_dim) float32 or None (text-only batch);
    vision_inputs: VisionInputs with a leading P axis, or None; image_rows (R * Np / merge^2,) int32 or None;
    num_truncated () int32: rows cut before a sampled <|image_pad|> / <|video_pad|>.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    response_positions: np.ndarray
    response_tokens: np.ndarray
    response_mask: np.ndarray
    sampler_logprobs: np.ndarray
    pixel_values: np.ndarray | None
    pixel_values_pixelated: np.ndarray | None
    vision_inputs: VisionInputs | None
    image_rows: np.ndarray | None
    num_truncated: np.ndarray


def build_train_batch(prompts: PromptBatch, rollout_tokens: np.ndarray, response_mask: np.ndarray,
                      num_rollouts: int, cfg: Qwen3VLConfig, *, sampler_logprobs: np.ndarray | None = None,
                      seq_len: int | None = None, pad_token_id: int = 0) -> TrainBatch:
    """Host-side (numpy) assembly of a `TrainBatch` from the pipeline's prompts and the sampler's output.

    Args:
      prompts: the `data.batch.PromptBatch` the rollouts answer (P prompts, no filler rows); with images it
        must hold both views (pixel_values_pixelated).
      rollout_tokens: (P * num_rollouts, Tr) int sampled tokens, rollouts of one prompt adjacent.
      response_mask: (P * num_rollouts, Tr) 1 on valid tokens (a prefix of each row).
      num_rollouts: rollouts per prompt.
      cfg: the model config (the <|image_pad|> / <|video_pad|> ids that cut a row).
      sampler_logprobs: optional (P * num_rollouts, Tr) sampler log-probs of its tokens.
      seq_len: static T >= Tp + Tr (default Tp + Tr); use buckets to bound recompilation.
    Returns:
      TrainBatch of numpy arrays.
    """
    if not isinstance(prompts, PromptBatch):
        raise TypeError(f"build_train_batch takes a data.batch.PromptBatch (the pipeline's batches, or "
                        f"data.batch.from_flat(...)); got {type(prompts).__name__}")
    ids = np.asarray(prompts.input_ids)
    mask = np.asarray(prompts.attention_mask).astype(bool)
    tokens = np.asarray(rollout_tokens).astype(np.int32)
    resp_mask = np.asarray(response_mask).astype(bool)
    num_prompts, prompt_len = ids.shape
    num_rows, resp_len = tokens.shape
    if num_rows != num_prompts * num_rollouts:
        raise ValueError(f"rollout_tokens has {num_rows} rows; expected prompts * num_rollouts = "
                         f"{num_prompts} * {num_rollouts} (rollouts of one prompt adjacent)")
    if resp_mask.shape != tokens.shape:
        raise ValueError(f"response_mask shape {resp_mask.shape} != rollout_tokens shape {tokens.shape}")
    lengths = mask.sum(1)
    if not np.array_equal(mask, np.arange(prompt_len)[None] < lengths[:, None]):
        raise ValueError("prompt attention_mask must be right padded (ones, then zeros)")
    if np.any(lengths == 0):
        raise ValueError(f"prompts {np.nonzero(lengths == 0)[0].tolist()} are empty (filler rows: "
                         "use prompts.without_filler())")
    resp_lengths = resp_mask.sum(1)
    if not np.array_equal(resp_mask, np.arange(resp_len)[None] < resp_lengths[:, None]):
        raise ValueError("response_mask must be a prefix mask per row (valid tokens, then padding)")
    total_len = prompt_len + resp_len if seq_len is None else int(seq_len)
    if total_len < int((lengths.max() if num_prompts else 0) + resp_len):
        raise ValueError(f"seq_len={seq_len} is shorter than the longest prompt ({lengths.max()}) + Tr ({resp_len})")
    if prompts.pixel_values is not None and prompts.pixel_values_pixelated is None:
        raise ValueError("the prompt batch has pixel_values but no pixel_values_pixelated (the pixelated view "
                         "the teacher scores for the visual advantage)")

    # Rows cut before a sampled vision placeholder (see module docstring).
    resp_mask = resp_mask.copy()
    feed_len = resp_lengths.copy()  # response tokens fed as inputs
    num_truncated = 0
    for r in range(num_rows):
        bad = np.nonzero(np.isin(tokens[r, :resp_lengths[r]], (cfg.image_token_id, cfg.video_token_id)))[0]
        if len(bad):
            j = int(bad[0])
            resp_mask[r, j + 1:] = False
            feed_len[r] = j
            num_truncated += 1

    prompt_pos, next_positions = np.asarray(prompts.position_ids), prompts.next_positions
    input_ids = np.full((num_rows, total_len), pad_token_id, np.int32)
    attention_mask = np.zeros((num_rows, total_len), np.int32)
    position_ids = np.zeros((3, num_rows, total_len), np.int32)
    response_positions = np.zeros((num_rows, resp_len), np.int32)
    for r in range(num_rows):
        p = r // num_rollouts
        n, m = int(lengths[p]), int(feed_len[r])
        input_ids[r, :n] = ids[p, :n]
        input_ids[r, n:n + m] = tokens[r, :m]
        attention_mask[r, :n + m] = 1
        position_ids[:, r, :n] = prompt_pos[:, p, :n]
        position_ids[:, r, n:n + m] = int(next_positions[p]) + np.arange(m)
        response_positions[r] = np.minimum(n - 1 + np.arange(resp_len), total_len - 1)

    if sampler_logprobs is None:
        sampler_logprobs = np.zeros(tokens.shape, np.float32)
    return TrainBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        response_positions=response_positions, response_tokens=tokens, response_mask=resp_mask.astype(np.float32),
        sampler_logprobs=np.asarray(sampler_logprobs, np.float32), pixel_values=prompts.pixel_values,
        pixel_values_pixelated=prompts.pixel_values_pixelated, vision_inputs=prompts.vision_inputs,
        image_rows=prompts.image_rows(num_rollouts), num_truncated=np.asarray(num_truncated, np.int32))


def batch_partition_specs(batch: TrainBatch, mesh: Mesh, rules=None) -> TrainBatch:
    """PartitionSpecs for a TrainBatch: rows / prompts on the batch mesh axes, the rest replicated."""
    def spec(x, batch_axis):  # x: an array or a jax.ShapeDtypeStruct
        if x is None:
            return None
        shape = tuple(np.shape(x)) if isinstance(x, np.ndarray) else tuple(x.shape)
        axes = [None] * len(shape)
        if batch_axis is not None:
            axes[batch_axis] = "batch"
        return model_sharding.logical_to_spec(axes, rules, mesh, shape)

    vision = None
    if batch.vision_inputs is not None:
        vision = type(batch.vision_inputs)(*(spec(f, 0) for f in batch.vision_inputs))
    return TrainBatch(
        input_ids=spec(batch.input_ids, 0), attention_mask=spec(batch.attention_mask, 0),
        position_ids=spec(batch.position_ids, 1), response_positions=spec(batch.response_positions, 0),
        response_tokens=spec(batch.response_tokens, 0), response_mask=spec(batch.response_mask, 0),
        sampler_logprobs=spec(batch.sampler_logprobs, 0), pixel_values=spec(batch.pixel_values, 0),
        pixel_values_pixelated=spec(batch.pixel_values_pixelated, 0), vision_inputs=vision,
        image_rows=spec(batch.image_rows, None), num_truncated=spec(batch.num_truncated, None))


def shard_batch(batch: TrainBatch, mesh: Mesh | None = None, rules=None) -> TrainBatch:
    """Moves a host TrainBatch to device(s): on a mesh, rows / prompts split over the batch axes."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    specs = batch_partition_specs(batch, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), batch, specs,
                        is_leaf=lambda x: x is None)
