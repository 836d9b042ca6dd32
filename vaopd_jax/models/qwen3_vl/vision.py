"""The Qwen3-VL vision tower: patch embedding, learned + 2D rotary positions, ViT blocks (scanned over
stacked parameters), the patch merger and the deepstack mergers.

All grid-dependent quantities arrive precomputed in a `VisionInputs` (rope.prepare_vision_inputs), so the
tower is jittable with static shapes; pixel rows may be padded (padding rows form their own attention segment
and are never gathered into the text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import MaskSpec, attend
from .config import Qwen3VLConfig
from .layers import dense, gelu, layer_norm, maybe_remat, param
from .rope import VisionInputs, apply_rotary, vision_cos_sin


class VisionBlocks(nnx.Module):
    """`depth` ViT blocks, parameters stacked on a leading 'layers' axis."""

    def __init__(self, cfg: Qwen3VLConfig, dtype, rngs: nnx.Rngs):
        v = cfg.vision
        L, E, F = v.depth, v.hidden_size, v.intermediate_size
        self.norm1_scale = param(rngs, (L, E), ("layers", "vision_embed"), dtype, "ones")
        self.norm1_bias = param(rngs, (L, E), ("layers", "vision_embed"), dtype, "zeros")
        self.norm2_scale = param(rngs, (L, E), ("layers", "vision_embed"), dtype, "ones")
        self.norm2_bias = param(rngs, (L, E), ("layers", "vision_embed"), dtype, "zeros")
        self.qkv_kernel = param(rngs, (L, E, 3 * E), ("layers", "vision_embed", "vision_qkv"), dtype)
        self.qkv_bias = param(rngs, (L, 3 * E), ("layers", "vision_qkv"), dtype, "zeros")
        self.proj_kernel = param(rngs, (L, E, E), ("layers", "vision_heads", "vision_embed"), dtype)
        self.proj_bias = param(rngs, (L, E), ("layers", "vision_embed"), dtype, "zeros")
        self.fc1_kernel = param(rngs, (L, E, F), ("layers", "vision_embed", "vision_mlp"), dtype)
        self.fc1_bias = param(rngs, (L, F), ("layers", "vision_mlp"), dtype, "zeros")
        self.fc2_kernel = param(rngs, (L, F, E), ("layers", "vision_mlp", "vision_embed"), dtype)
        self.fc2_bias = param(rngs, (L, E), ("layers", "vision_embed"), dtype, "zeros")

    def stacked(self) -> dict:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class PatchMergers(nnx.Module):
    """`count` patch mergers stacked on a leading axis. postshuffle_norm=False: the final merger (LayerNorm
    over each patch, then group 2x2); True: the deepstack mergers (group 2x2, then LayerNorm over 4*hidden)."""

    def __init__(self, cfg: Qwen3VLConfig, count: int, postshuffle_norm: bool, dtype, rngs: nnx.Rngs):
        v = cfg.vision
        E4 = v.hidden_size * v.merge_unit
        norm_dim = E4 if postshuffle_norm else v.hidden_size
        norm_axis = "vision_merged" if postshuffle_norm else "vision_embed"
        self.postshuffle_norm = postshuffle_norm
        self.norm_scale = param(rngs, (count, norm_dim), ("stack", norm_axis), dtype, "ones")
        self.norm_bias = param(rngs, (count, norm_dim), ("stack", norm_axis), dtype, "zeros")
        self.fc1_kernel = param(rngs, (count, E4, E4), ("stack", "vision_merged", "vision_mlp"), dtype)
        self.fc1_bias = param(rngs, (count, E4), ("stack", "vision_mlp"), dtype, "zeros")
        self.fc2_kernel = param(rngs, (count, E4, v.out_hidden_size), ("stack", "vision_mlp", "embed"), dtype)
        self.fc2_bias = param(rngs, (count, v.out_hidden_size), ("stack", "embed"), dtype, "zeros")

    def apply(self, i: int, x, cfg: Qwen3VLConfig, dtype):
        """x (N, E) patch rows -> (N / merge^2, out_hidden) merged rows."""
        v = cfg.vision
        E4 = v.hidden_size * v.merge_unit
        scale, bias = self.norm_scale[i], self.norm_bias[i]
        if self.postshuffle_norm:
            x = layer_norm(x.reshape(-1, E4), scale, bias, v.layer_norm_eps)
        else:
            x = layer_norm(x, scale, bias, v.layer_norm_eps).reshape(-1, E4)
        # The merger MLP uses exact (erf) GELU: torch nn.GELU() default.
        x = gelu(dense(x, self.fc1_kernel[i], self.fc1_bias[i], dtype), approximate=False)
        return dense(x, self.fc2_kernel[i], self.fc2_bias[i], dtype)


def vision_block(p: dict, x, cos, sin, mask, cfg: Qwen3VLConfig, dtype):
    """One ViT block. p: one layer's slice of VisionBlocks.stacked(); x (N, E); mask (1, 1, N, N) bool or an attention.MaskSpec (segment ids)."""
    v = cfg.vision
    n = x.shape[0]
    h = layer_norm(x, p["norm1_scale"], p["norm1_bias"], v.layer_norm_eps)
    qkv = dense(h, p["qkv_kernel"], p["qkv_bias"], dtype).reshape(n, 3, v.num_heads, v.head_dim)
    q = apply_rotary(qkv[:, 0], cos[:, None, :], sin[:, None, :])
    k = apply_rotary(qkv[:, 1], cos[:, None, :], sin[:, None, :])
    attn = attend(q[None], k[None], qkv[None, :, 2], mask, cfg.attention_impl, chunk_size=cfg.attention_chunk_size)
    x = x + dense(attn.reshape(n, -1), p["proj_kernel"], p["proj_bias"], dtype)
    h = layer_norm(x, p["norm2_scale"], p["norm2_bias"], v.layer_norm_eps)
    approx = v.hidden_act != "gelu"  # gelu_pytorch_tanh / gelu_new: tanh approximation
    h = gelu(dense(h, p["fc1_kernel"], p["fc1_bias"], dtype), approximate=approx)
    return x + dense(h, p["fc2_kernel"], p["fc2_bias"], dtype)


class VisionTower(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, param_dtype, compute_dtype, rngs: nnx.Rngs):
        v = cfg.vision
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.patch_kernel = param(rngs, (v.patch_dim, v.hidden_size), ("vision_patch", "vision_embed"), param_dtype)
        self.patch_bias = param(rngs, (v.hidden_size,), ("vision_embed",), param_dtype, "zeros")
        self.pos_embed = param(rngs, (v.num_position_embeddings, v.hidden_size), ("vision_pos", "vision_embed"),
                               param_dtype)
        self.blocks = VisionBlocks(cfg, param_dtype, rngs)
        self.merger = PatchMergers(cfg, 1, False, param_dtype, rngs)
        n_ds = len(v.deepstack_visual_indexes)
        self.deepstack_mergers = PatchMergers(cfg, n_ds, True, param_dtype, rngs) if n_ds else None

    def __call__(self, pixel_values, vision_inputs: VisionInputs):
        """pixel_values (N, patch_dim) rows (N padded as vision_inputs) ->
        (image_embeds (N/merge^2, out_hidden), tuple of deepstack features, each (N/merge^2, out_hidden))."""
        cfg, v, dt = self.cfg, self.cfg.vision, self.compute_dtype
        vi = vision_inputs
        if pixel_values.shape[0] != vi.valid.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but vision_inputs describe "
                             f"{vi.valid.shape[0]} (pad both with the same pad_patches_to)")
        x = dense(pixel_values, self.patch_kernel[...], self.patch_bias[...], dt)
        table = self.pos_embed[...].astype(jnp.float32)
        pos = jnp.sum(table[vi.interp_indices] * vi.interp_weights[..., None], axis=1)
        x = x + pos.astype(dt)
        cos, sin = vision_cos_sin(jnp.asarray(vi.rotary_pos), v)
        seg = jnp.asarray(vi.segment_ids)
        # Full bidirectional attention inside each image frame only (transformers: cu_seqlens chunks).
        mask = MaskSpec(segment_ids=seg[None])
        if cfg.attention_impl == "xla":
            mask = mask.dense(1, seg.shape[0], seg.shape[0])  # (1, 1, N, N)

        stacked = self.blocks.stacked()
        block = maybe_remat(lambda h, p: (vision_block(p, h, cos, sin, mask, cfg, dt), None), cfg.remat)
        deepstack = []
        start = 0
        for k, stop in enumerate(list(v.deepstack_visual_indexes) + [v.depth - 1]):
            if stop >= start:
                part = jax.tree.map(lambda a: a[start:stop + 1], stacked)
                x, _ = jax.lax.scan(block, x, part)
                start = stop + 1
            if k < len(v.deepstack_visual_indexes):
                deepstack.append(self.deepstack_mergers.apply(k, x, cfg, dt))
        return self.merger.apply(0, x, cfg, dt), tuple(deepstack)
