"""The Qwen3 dense text decoder of Qwen3-VL: stacked layer parameters, scanned layers, KV cache.

Pure layer function `decoder_layer` over one layer's parameter slice; the `TextModel` module owns the
parameters and runs the layers with `jax.lax.scan` (deepstack layers, which add visual features to their
output, are unrolled first).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Qwen3VLConfig
from .attention import attend
from .layers import maybe_remat, param, rms_norm
from .rope import apply_rotary
from .sharding import constrain


class KVCache(NamedTuple):
    """Preallocated decoder KV cache (a pytree).

    k, v  (L, B, S, K, D) compute dtype: per layer keys (after q/k-norm and MRoPE) and values.
    valid (B, S) bool: slot holds a real token (prompt padding stays False, so right-padded prompts work).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array


class DecoderLayers(nnx.Module):
    """`num_hidden_layers` Qwen3 decoder layers with parameters stacked on a leading 'layers' axis."""

    def __init__(self, cfg: Qwen3VLConfig, dtype, rngs: nnx.Rngs):
        t = cfg.text
        L, E, F, N, K, D = (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
                            t.num_key_value_heads, t.head_dim)
        self.input_norm = param(rngs, (L, E), ("layers", "embed"), dtype, "ones")
        self.post_attention_norm = param(rngs, (L, E), ("layers", "embed"), dtype, "ones")
        self.q_kernel = param(rngs, (L, E, N, D), ("layers", "embed", "heads", "head_dim"), dtype)
        self.k_kernel = param(rngs, (L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), dtype)
        self.v_kernel = param(rngs, (L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), dtype)
        self.o_kernel = param(rngs, (L, N, D, E), ("layers", "heads", "head_dim", "embed"), dtype)
        self.q_norm = param(rngs, (L, D), ("layers", "head_dim"), dtype, "ones")
        self.k_norm = param(rngs, (L, D), ("layers", "head_dim"), dtype, "ones")
        self.gate_kernel = param(rngs, (L, E, F), ("layers", "embed", "mlp"), dtype)
        self.up_kernel = param(rngs, (L, E, F), ("layers", "embed", "mlp"), dtype)
        self.down_kernel = param(rngs, (L, F, E), ("layers", "mlp", "embed"), dtype)

    def stacked(self) -> dict:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


def decoder_layer(p: dict, x, cos, sin, mask, cfg: Qwen3VLConfig, dtype, kv=None, write_index=None):
    """One decoder layer.

    p: one layer's slice of DecoderLayers.stacked(); x (B, T, E); cos/sin (B, T, D) fp32;
    mask (B, 1, T, S) bool (True = may attend) or an attention.MaskSpec (causal + key padding, kv=None only).
    kv: None (attend to this call's own T keys, S = T) or (k, v) cache slices (B, S, K, D): the new keys are
    written at slots [write_index, write_index + T) and attention covers all S cache slots.
    Returns (x, updated (k, v) cache slices, or None when kv is None).
    """
    t = cfg.text
    eps = t.rms_norm_eps
    h = rms_norm(x, p["input_norm"], eps).astype(dtype)
    q = jnp.einsum("bte,enh->btnh", h, p["q_kernel"].astype(dtype))
    k = jnp.einsum("bte,enh->btnh", h, p["k_kernel"].astype(dtype))
    v = jnp.einsum("bte,enh->btnh", h, p["v_kernel"].astype(dtype))
    # q_norm / k_norm: RMSNorm over head_dim per head, before the rotary embedding.
    q = rms_norm(q, p["q_norm"], eps)
    k = rms_norm(k, p["k_norm"], eps)
    q = apply_rotary(q, cos[:, :, None, :], sin[:, :, None, :])
    k = apply_rotary(k, cos[:, :, None, :], sin[:, :, None, :])
    if kv is not None:
        ck, cv = kv
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), write_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), write_index, axis=1)
    # A MaskSpec mask goes through cfg.attention_impl ('chunked': no T x T scores); a dense mask is the XLA path.
    attn = attend(q, k.astype(dtype), v.astype(dtype), mask, cfg.attention_impl, chunk_size=cfg.attention_chunk_size)
    x = x + jnp.einsum("btnh,nhe->bte", attn, p["o_kernel"].astype(dtype))
    h = rms_norm(x, p["post_attention_norm"], eps).astype(dtype)
    gate = jnp.dot(h, p["gate_kernel"].astype(dtype))
    up = jnp.dot(h, p["up_kernel"].astype(dtype))
    x = x + jnp.dot(jax.nn.silu(gate) * up, p["down_kernel"].astype(dtype))
    return constrain(x, ("batch", None, None)), (None if kv is None else (k, v))


def scatter_rows(input_ids, token_id: int, rows):
    """Places rows (M, E) at the positions of `token_id` in input_ids (B, T), in row-major order.

    Returns (values (B, T, E), is_token (B, T) bool); values are 0 elsewhere. Fixed shapes: cumsum index +
    gather + where (the equivalent of transformers' masked_scatter, no boolean indexing).
    """
    is_tok = input_ids == token_id
    order = jnp.cumsum(is_tok.reshape(-1)).reshape(is_tok.shape) - 1
    gathered = jnp.take(rows, jnp.clip(order, 0, rows.shape[0] - 1), axis=0)
    return jnp.where(is_tok[..., None], gathered, jnp.zeros((), rows.dtype)), is_tok


class TextModel(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, param_dtype, compute_dtype, rngs: nnx.Rngs):
        t = cfg.text
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.embed_tokens = param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = DecoderLayers(cfg, param_dtype, rngs)
        self.norm = param(rngs, (t.hidden_size,), ("embed",), param_dtype, "ones")

    def embed(self, input_ids, image_embeds=None):
        """input_ids (B, T) -> (B, T, E) embeddings, visual rows placed at <|image_pad|> positions."""
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.compute_dtype)
        if image_embeds is not None and image_embeds.shape[0] > 0:
            vis, is_img = scatter_rows(input_ids, self.cfg.image_token_id, image_embeds.astype(x.dtype))
            x = jnp.where(is_img[..., None], vis, x)
        return constrain(x, ("batch", None, None))

    def run_layers(self, x, cos, sin, mask, input_ids, deepstack_embeds=(), kv=None, write_index=None):
        """Runs all layers. x (B, T, E); deepstack_embeds: tuple of (M, E), added at <|image_pad|> positions after
        layers 0, 1, ... (one feature set per layer). kv: None or (k, v) caches (L, B, S, K, D).
        Returns (x before the final norm, updated (k, v) caches or None)."""
        cfg, dt = self.cfg, self.compute_dtype
        stacked = self.layers.stacked()
        n_ds = len(deepstack_embeds or ())

        def layer(h, xs):
            p, kv_l = xs
            h, kv_out = decoder_layer(p, h, cos, sin, mask, cfg, dt, kv_l, write_index)
            return h, kv_out

        layer = maybe_remat(layer, cfg.remat)
        kv_parts = []
        for i in range(n_ds):  # unrolled: each is followed by its deepstack injection
            p_i = jax.tree.map(lambda a: a[i], stacked)
            kv_i = None if kv is None else (kv[0][i], kv[1][i])
            x, kv_out = layer(x, (p_i, kv_i))
            kv_parts.append(None if kv_out is None else jax.tree.map(lambda a: a[None], kv_out))
            feat, _ = scatter_rows(input_ids, cfg.image_token_id, deepstack_embeds[i].astype(x.dtype))
            x = x + feat
        rest = jax.tree.map(lambda a: a[n_ds:], stacked)
        kv_rest = None if kv is None else (kv[0][n_ds:], kv[1][n_ds:])
        if cfg.text.num_hidden_layers > n_ds:
            x, kv_out = jax.lax.scan(layer, x, (rest, kv_rest))
            kv_parts.append(kv_out)
        if kv is None:
            return x, None
        k_all = jnp.concatenate([a[0] for a in kv_parts], axis=0)
        v_all = jnp.concatenate([a[1] for a in kv_parts], axis=0)
        return x, (k_all, v_all)

    def final_norm(self, x):
        return rms_norm(x, self.norm[...], self.cfg.text.rms_norm_eps)
