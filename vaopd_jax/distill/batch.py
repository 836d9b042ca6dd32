"""`TrainBatch`: the device-ready inputs of one train step, and its host-side builder.

Layout (R = P prompts * K rollouts, the K rollouts of a prompt on adjacent rows):
each row is the prompt's real tokens followed by the rollout's response tokens,
right-padded to a static length T (``seq_len``, default Tp + Tr). The hidden
state at ``response_positions[r, j]`` (= prompt length - 1 + j) predicts
response token j, so every per-token array of the loss is (R, Tr), in the
sampler's own layout.

MRoPE positions: the prompt's positions from ``get_rope_index``; response token
j gets max_prompt_position + 1 + j on all three axes (the position a
single-prompt KV-cache decode gives it: cache position + rope_delta).

Images: the vision tower runs once per prompt per view. Each prompt's patch rows
are padded to a static ``Np`` (a multiple of merge^2), giving pixel arrays
(P, Np, 1536) and per-prompt ``VisionInputs`` stacked on a leading P axis; the
merged features (P, Mp, E), Mp = Np / merge^2, are handed to the K rollouts of
each prompt by one index gather, ``image_rows`` (R * Mp,), listing feature rows in
the row-major order of the <|image_pad|> tokens of ``input_ids``.

Response tokens equal to <|image_pad|> / <|video_pad|> (a degenerate sample) are
never fed as inputs: the row is cut right before such a token, which itself stays
a target (the KL at its position is well defined) and everything after it leaves
the response mask. ``num_truncated`` counts these rows (project choice; the
sampler embeds such a token as text, which the image scatter of the forward
cannot reproduce).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from vaopd_jax.models.qwen3_vl import Qwen3VLConfig, VisionInputs, get_rope_index, prepare_vision_inputs


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


def _image_runs(ids: np.ndarray, image_token_id: int) -> list[int]:
    """Lengths of the maximal <|image_pad|> runs of one prompt (one run = one image)."""
    is_img = np.concatenate([[False], ids == image_token_id, [False]])
    starts = np.nonzero(~is_img[:-1] & is_img[1:])[0]
    ends = np.nonzero(is_img[:-1] & ~is_img[1:])[0]
    return list(ends - starts)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def build_train_batch(prompt_batch: Mapping[str, np.ndarray], rollout_tokens: np.ndarray,
                      response_mask: np.ndarray, num_rollouts: int, cfg: Qwen3VLConfig, *,
                      sampler_logprobs: np.ndarray | None = None, seq_len: int | None = None,
                      patches_per_prompt: int | None = None, pad_token_id: int = 0) -> TrainBatch:
    """Host-side (numpy) assembly of a `TrainBatch` from the data pipeline's prompts and the sampler's output.

    Args:
      prompt_batch: 'input_ids' (P, Tp) and 'attention_mask' (P, Tp), right padded; for images also
        'pixel_values' (N, patch_dim) rows of all images in order (N may be padded), 'pixel_values_pixelated'
        (same shape, same grid), 'image_grid_thw' (M, 3) (rows past the real images are zero padding) and
        optionally 'num_images' (total, or per prompt) to trim it.
      rollout_tokens: (P * K, Tr) int sampled tokens, rollouts of one prompt adjacent.
      response_mask: (P * K, Tr) 1 on valid tokens (a prefix of each row).
      num_rollouts: K.
      cfg: the model config (special token ids, merge size, rope).
      sampler_logprobs: optional (P * K, Tr) sampler log-probs of its tokens.
      seq_len: static T >= Tp + Tr (default Tp + Tr); use buckets to bound recompilation.
      patches_per_prompt: static Np (default: the largest prompt's patch count rounded up to a power of two).
    Returns:
      TrainBatch of numpy arrays.
    """
    ids = np.asarray(prompt_batch["input_ids"])
    mask = np.asarray(prompt_batch["attention_mask"]).astype(bool)
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
        raise ValueError(f"prompts {np.nonzero(lengths == 0)[0].tolist()} are empty")
    resp_lengths = resp_mask.sum(1)
    if not np.array_equal(resp_mask, np.arange(resp_len)[None] < resp_lengths[:, None]):
        raise ValueError("response_mask must be a prefix mask per row (valid tokens, then padding)")
    total_len = prompt_len + resp_len if seq_len is None else int(seq_len)
    if total_len < int((lengths.max() if num_prompts else 0) + resp_len):
        raise ValueError(f"seq_len={seq_len} is shorter than the longest prompt ({lengths.max()}) + Tr ({resp_len})")

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

    # Prompt positions (3, P, Tp) and deltas; images in order over the flattened batch.
    grids = None
    if "image_grid_thw" in prompt_batch and prompt_batch["image_grid_thw"] is not None:
        grids = np.asarray(prompt_batch["image_grid_thw"], np.int64).reshape(-1, 3)
        if "num_images" in prompt_batch and prompt_batch["num_images"] is not None:
            grids = grids[:int(np.sum(prompt_batch["num_images"]))]
        else:
            grids = grids[np.any(grids != 0, axis=1)]
        if len(grids) == 0:
            grids = None
    prompt_pos, deltas = get_rope_index(ids, grids, mask, cfg)

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
        position_ids[:, r, n:n + m] = n + int(deltas[p]) + np.arange(m)
        response_positions[r] = np.minimum(n - 1 + np.arange(resp_len), total_len - 1)

    if sampler_logprobs is None:
        sampler_logprobs = np.zeros(tokens.shape, np.float32)
    pixel_values = pixel_values_pix = vision_inputs = image_rows = None
    if grids is not None:
        pixel_values, pixel_values_pix, vision_inputs, image_rows = _per_prompt_images(
            prompt_batch, ids, mask, grids, num_rollouts, cfg, patches_per_prompt)
    return TrainBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        response_positions=response_positions, response_tokens=tokens, response_mask=resp_mask.astype(np.float32),
        sampler_logprobs=np.asarray(sampler_logprobs, np.float32), pixel_values=pixel_values,
        pixel_values_pixelated=pixel_values_pix, vision_inputs=vision_inputs, image_rows=image_rows,
        num_truncated=np.asarray(num_truncated, np.int32))


def _per_prompt_images(prompt_batch, ids, mask, grids, num_rollouts, cfg, patches_per_prompt):
    """Splits the flat pixel rows per prompt and pads them to a common Np (see module docstring)."""
    merge_unit = cfg.vision.merge_unit
    pixels = np.asarray(prompt_batch["pixel_values"], np.float32)
    if "pixel_values_pixelated" not in prompt_batch:
        raise ValueError("prompt_batch has 'pixel_values' but no 'pixel_values_pixelated' (the pixelated view)")
    pixels_pix = np.asarray(prompt_batch["pixel_values_pixelated"], np.float32)
    if pixels_pix.shape != pixels.shape:
        raise ValueError(f"pixel_values_pixelated shape {pixels_pix.shape} != pixel_values shape {pixels.shape}: "
                         "both views must have the same grid")
    patches = np.prod(grids, axis=1)
    if pixels.shape[0] < patches.sum():
        raise ValueError(f"pixel_values has {pixels.shape[0]} rows; image_grid_thw needs {patches.sum()}")
    num_prompts = ids.shape[0]
    per_prompt_grids, start = [], 0
    for p in range(num_prompts):
        runs = _image_runs(ids[p][mask[p]], cfg.image_token_id)
        per_prompt_grids.append(grids[start:start + len(runs)])
        tokens_needed = patches[start:start + len(runs)] // merge_unit
        if len(runs) and (len(tokens_needed) != len(runs) or not np.array_equal(tokens_needed, runs)):
            raise ValueError(f"prompt {p}: <|image_pad|> runs {runs} do not match image_grid_thw rows "
                             f"{grids[start:start + len(runs)].tolist()}")
        start += len(runs)
    if start != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold {start}")
    counts = [int(np.prod(g, axis=1).sum()) for g in per_prompt_grids]
    if patches_per_prompt is None:
        patches_per_prompt = max(merge_unit, 1 << max(0, (max(counts) - 1).bit_length()))
        patches_per_prompt = _round_up(patches_per_prompt, merge_unit)
    if patches_per_prompt < max(counts) or patches_per_prompt % merge_unit:
        raise ValueError(f"patches_per_prompt={patches_per_prompt} must be >= the largest prompt's patch count "
                         f"{max(counts)} and a multiple of {merge_unit}")
    patch_dim = pixels.shape[1]
    out = np.zeros((num_prompts, patches_per_prompt, patch_dim), np.float32)
    out_pix = np.zeros_like(out)
    vision = []
    offset = 0
    for p in range(num_prompts):
        out[p, :counts[p]] = pixels[offset:offset + counts[p]]
        out_pix[p, :counts[p]] = pixels_pix[offset:offset + counts[p]]
        offset += counts[p]
        vision.append(prepare_vision_inputs(per_prompt_grids[p], cfg, pad_patches_to=patches_per_prompt))
    vision_inputs = VisionInputs(*(np.stack(field) for field in zip(*vision)))
    merged_per_prompt = patches_per_prompt // merge_unit
    rows = [p * merged_per_prompt + np.arange(counts[p] // merge_unit)
            for p in range(num_prompts) for _ in range(num_rollouts)]
    image_rows = np.zeros(num_prompts * num_rollouts * merged_per_prompt, np.int32)
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    image_rows[:len(flat)] = flat
    return out, out_pix, vision_inputs, image_rows
