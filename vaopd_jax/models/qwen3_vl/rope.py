"""Rotary embeddings and position ids for Qwen3-VL.

Device side (pure jnp, jittable):
  * `mrope_cos_sin(position_ids, cfg)`: interleaved MRoPE tables (B, T, head_dim) from (3, B, T) positions.
  * `vision_cos_sin(rotary_pos, vcfg)`: 2D axial rope tables (N, head_dim) from per-patch (row, col).
  * `apply_rotary(x, cos, sin)`: rotate-half convention, in fp32.
Host side (numpy, outside jit, no device arrays):
  * `get_rope_index(input_ids, image_grid_thw, attention_mask, config)` -> (position_ids (3,B,T), rope_deltas (B,))
    equal to transformers' `Qwen3VLModel.get_rope_index`.
  * `prepare_vision_inputs(image_grid_thw, config, pad_patches_to=None)` -> `VisionInputs`, every
    grid-dependent quantity of the vision tower as static-shape arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .config import Qwen3VLConfig, TextConfig, VisionConfig


# ----------------------------------------------------------------------------- device side
def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x (..., T, N, D); cos/sin broadcastable to (..., T, 1, D). Computed in fp32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def mrope_axis_of_frequency(text: TextConfig) -> np.ndarray:
    """(head_dim/2,) int: which position axis (0 T, 1 H, 2 W) drives each frequency.

    Interleaved MRoPE (transformers `recomposition_frequencies`): start with T everywhere, then indices
    1, 4, 7, ... below 3*section[1] take H and 2, 5, 8, ... below 3*section[2] take W.
    """
    n = text.head_dim // 2
    axis = np.zeros(n, np.int32)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset:text.mrope_section[dim] * 3:3] = dim
    return axis


def mrope_cos_sin(position_ids, text: TextConfig):
    """position_ids (3, B, T) int -> cos, sin (B, T, head_dim) float32."""
    d = text.head_dim
    inv_freq = 1.0 / (text.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))  # (D/2,)
    axis = mrope_axis_of_frequency(text)
    pos = position_ids.astype(jnp.float32)  # (3, B, T)
    # Pick, per frequency, the position of the axis that drives it: (B, T, D/2).
    pos_per_freq = jnp.take(jnp.moveaxis(pos, 0, -1), jnp.asarray(axis), axis=-1)
    freqs = pos_per_freq * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rotary_pos, vision: VisionConfig):
    """rotary_pos (N, 2) int (row, col) -> cos, sin (N, head_dim) float32.

    Axial rope (transformers `Qwen3VLVisionRotaryEmbedding`): head_dim/4 frequencies with
    inv_freq = theta^(-2i/(head_dim/2)); angles [row*f, col*f] concatenated, then repeated twice.
    """
    spatial = vision.head_dim // 2
    inv_freq = 1.0 / (vision.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = rotary_pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (N, 2, D/4)
    hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # (N, D/2)
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ----------------------------------------------------------------------------- host side
def get_rope_index(input_ids, image_grid_thw, attention_mask, config: Qwen3VLConfig):
    """MRoPE position ids, equal to transformers' `Qwen3VLModel.get_rope_index` for images.

    input_ids (B, T) int; image_grid_thw (n_images, 3) or None (images in order over the flattened
    batch); attention_mask (B, T) 1 = real token, or None.
    Returns position_ids (3, B, T) int32 (padding positions 0) and rope_deltas (B,) int32
    (max position + 1 - number of real tokens; decode position = cache position + delta).
    Each maximal run of <|image_pad|> tokens is one image; its run length must equal t*h*w/merge^2.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {input_ids.shape}")
    b, t = input_ids.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    merge = config.vision.spatial_merge_size
    if np.any(input_ids[mask] == config.video_token_id):
        raise ValueError(f"video tokens (id {config.video_token_id}) are not supported by this port")
    position_ids = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    next_image = 0
    for row in range(b):
        ids = input_ids[row][mask[row]]
        is_img = ids == config.image_token_id
        pieces = []
        cur = 0
        i = 0
        n = len(ids)
        while i < n:
            j = i
            while j < n and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                pieces.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                if next_image >= len(grids):
                    raise ValueError(f"sample {row}: more <|image_pad|> runs than image_grid_thw rows "
                                     f"({len(grids)})")
                gt, gh, gw = (int(x) for x in grids[next_image])
                lh, lw = gh // merge, gw // merge
                if gt * lh * lw != j - i:
                    raise ValueError(f"sample {row}: image {next_image} has {j - i} <|image_pad|> tokens but "
                                     f"image_grid_thw {gt, gh, gw} needs t*h*w/{merge**2} = {gt * lh * lw}")
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(lh) + cur, np.arange(lw) + cur, indexing="ij")
                vis = np.stack([tt, hh, ww]).reshape(3, -1)
                vis[0] += cur
                pieces.append(vis)
                cur += max(gh, gw) // merge
                next_image += 1
            i = j
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 - n) if n else 0
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {next_image} images")
    return position_ids.astype(np.int32), deltas.astype(np.int32)


def text_position_ids(attention_mask) -> np.ndarray:
    """(3, B, T) positions for text-only input, as transformers uses them (arange; padding is irrelevant)."""
    b, t = np.asarray(attention_mask).shape
    return np.broadcast_to(np.arange(t, dtype=np.int32), (3, b, t)).copy()


class VisionInputs(NamedTuple):
    """Grid-dependent vision-tower inputs with static shapes (a pytree of arrays).

    N = padded patch rows (multiple of merge^2), M = N / merge^2 merged rows.
      rotary_pos     (N, 2) int32   (row, col) of each patch for the 2D rope.
      interp_indices (N, 4) int32   bilinear taps into the learned (side*side) position table.
      interp_weights (N, 4) float32 their weights (0 on padding rows).
      segment_ids    (N,) int32     one id per image frame (attention is within a frame); -1 = padding.
      valid          (N,) bool      real patch rows.
      merged_valid   (M,) bool      real merged rows (the first n_image_tokens rows).
    """

    rotary_pos: np.ndarray
    interp_indices: np.ndarray
    interp_weights: np.ndarray
    segment_ids: np.ndarray
    valid: np.ndarray
    merged_valid: np.ndarray


def num_patches(image_grid_thw) -> int:
    g = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    return int(np.prod(g, axis=1).sum())


def prepare_vision_inputs(image_grid_thw, config: Qwen3VLConfig, pad_patches_to: int | None = None) -> VisionInputs:
    """Host-side precompute of every grid-dependent tensor of the vision tower (see `VisionInputs`).

    Matches transformers' `get_vision_position_ids`, `get_vision_attention_seqlens` and
    `get_vision_interpolation_indices_and_weights(mode='bilinear', align_corners=True)`.
    pad_patches_to: pad the patch rows to this count (>= the real count, multiple of merge^2) so that
    one compiled vision tower serves many image sizes.
    """
    v = config.vision
    merge = v.spatial_merge_size
    side = v.num_grid_per_side
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    rot, idx, wts, seg = [], [], [], []
    frame = 0
    for gt, gh, gw in grids.tolist():
        if gh % merge or gw % merge:
            raise ValueError(f"image_grid_thw row {(gt, gh, gw)}: h and w must be multiples of "
                             f"spatial_merge_size={merge}")
        # Patch order inside a frame: merge blocks row-major, then the merge x merge patches of a block.
        rows = np.arange(gh).reshape(gh // merge, merge, 1, 1)
        cols = np.arange(gw).reshape(1, 1, gw // merge, merge)
        row = np.broadcast_to(rows, (gh // merge, merge, gw // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
        col = np.broadcast_to(cols, (gh // merge, merge, gw // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
        # Align-corners bilinear: source coordinate = index * (side-1) / (size-1).
        hsrc = row * (side - 1) / max(gh - 1, 1)
        wsrc = col * (side - 1) / max(gw - 1, 1)
        hf, wf = np.floor(hsrc), np.floor(wsrc)
        h_taps = np.clip(hf[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
        w_taps = np.clip(wf[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
        h_w = np.clip(1 - np.abs(hsrc[:, None] - hf[:, None] - np.arange(2)), 0, None)
        w_w = np.clip(1 - np.abs(wsrc[:, None] - wf[:, None] - np.arange(2)), 0, None)
        taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        for _ in range(gt):
            rot.append(np.stack([row, col], -1))
            idx.append(taps)
            wts.append(weights)
            seg.append(np.full(gh * gw, frame))
            frame += 1
    n_real = sum(len(s) for s in seg)
    n = n_real if pad_patches_to is None else int(pad_patches_to)
    if n < n_real or n % v.merge_unit:
        raise ValueError(f"pad_patches_to={pad_patches_to} must be >= the real patch count {n_real} and a "
                         f"multiple of spatial_merge_size^2={v.merge_unit}")
    pad = n - n_real

    def cat(parts, shape_tail, dtype, fill):
        body = np.concatenate(parts, 0).astype(dtype) if parts else np.zeros((0,) + shape_tail, dtype)
        return np.concatenate([body, np.full((pad,) + shape_tail, fill, dtype)], 0)

    valid = np.arange(n) < n_real
    return VisionInputs(
        rotary_pos=cat(rot, (2,), np.int32, 0),
        interp_indices=cat(idx, (4,), np.int32, 0),
        interp_weights=cat(wts, (4,), np.float32, 0.0),
        segment_ids=cat(seg, (), np.int32, -1),
        valid=valid,
        merged_valid=valid.reshape(-1, v.merge_unit)[:, 0].copy(),
    )
