"""The Qwen3 text decoder of Qwen3-VL (dense, or mixture-of-experts): stacked layer parameters, scanned layers,
KV cache.

Pure layer function `decoder_layer` over one layer's parameter slice; the `TextModel` module owns the
parameters and runs the layers with `jax.lax.scan` (deepstack layers, which add visual features to their
output, are unrolled first). In a MoE model the MLP of a sparse layer is the routed-experts block (moe.py);
dense and sparse layers keep separate parameter stacks, and each run of consecutive layers of one kind is one
scan (the released MoE models are sparse throughout: one scan, as the dense model).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import moe
from .config import Qwen3VLConfig
from .attention import attend
from .layers import maybe_remat, param, rms_norm
from .rope import apply_rotary
from .sharding import constrain


class KVCache(NamedTuple):
    """Preallocated decoder KV cache (a pytree).

    k, v  (L, B, K, S, D) compute dtype: per layer keys (after q/k-norm and MRoPE) and values. Heads before
          slots, so the single-query decode attention contracts each (B, K) block (S, D) in place: batch dims
          leading on both operands, no transpose or GQA repeat of the cache per step.
    valid (B, S) bool: slot holds a real token (prompt padding stays False, so right-padded prompts work).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array


class DecoderLayers(nnx.Module):
    """`num_hidden_layers` Qwen3 decoder layers with parameters stacked on a leading 'layers' axis.

    Attention and norm parameters stack all L layers; the dense MLP kernels (gate/up/down_kernel) stack the dense
    layers only and the MoE parameters (moe.PARAM_NAMES) the sparse layers only (text.sparse_layers), in layer
    order. A dense model has no MoE parameters and stacks every layer's MLP."""

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
        n_sparse = sum(t.sparse_layers)
        if L - n_sparse:
            self.gate_kernel = param(rngs, (L - n_sparse, E, F), ("layers", "embed", "mlp"), dtype)
            self.up_kernel = param(rngs, (L - n_sparse, E, F), ("layers", "embed", "mlp"), dtype)
            self.down_kernel = param(rngs, (L - n_sparse, F, E), ("layers", "mlp", "embed"), dtype)
        if n_sparse:
            for name, value in moe.expert_params(cfg, n_sparse, dtype, rngs).items():
                setattr(self, name, value)

    def stacked(self) -> dict:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


DENSE_MLP_NAMES = ("gate_kernel", "up_kernel", "down_kernel")


def layer_runs(cfg: Qwen3VLConfig, start: int, stop: int) -> list[tuple[int, int, bool, int]]:
    """Layers [start, stop) as maximal runs of one MLP kind: (first, end, sparse, index of `first` in its kind's
    parameter stack). A dense model gives one run."""
    sparse = cfg.text.sparse_layers
    runs = []
    for i in range(start, stop):
        if runs and runs[-1][2] == sparse[i]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, sparse[i], sum(1 for j in range(i) if sparse[j] == sparse[i])])
    return [tuple(r) for r in runs]


def run_params(stacked: dict, first: int, end: int, sparse: bool, kind_first: int) -> dict:
    """The stacked parameters of layers [first, end) of one MLP kind (layer_runs): attention/norms sliced by layer,
    the MLP stack of that kind by its own index; the other kind's parameters left out."""
    mine, other = (moe.PARAM_NAMES, DENSE_MLP_NAMES) if sparse else (DENSE_MLP_NAMES, moe.PARAM_NAMES)
    n = end - first
    out = {}
    for name, value in stacked.items():
        if name in other:
            continue
        lo = kind_first if name in mine else first
        out[name] = value if (lo == 0 and n == value.shape[0]) else value[lo:lo + n]
    return out


def _qkv(p: dict, x, cos, sin, cfg: Qwen3VLConfig, dtype):
    """Attention inputs of one layer: x (B, T, E) -> q (B, T, N, D), k, v (B, T, K, D) in dtype (after q/k-norm
    and the rotary embedding)."""
    eps = cfg.text.rms_norm_eps
    h = rms_norm(x, p["input_norm"], eps).astype(dtype)
    q = jnp.einsum("bte,enh->btnh", h, p["q_kernel"].astype(dtype))
    k = jnp.einsum("bte,enh->btnh", h, p["k_kernel"].astype(dtype))
    v = jnp.einsum("bte,enh->btnh", h, p["v_kernel"].astype(dtype))
    # q_norm / k_norm: RMSNorm over head_dim per head, before the rotary embedding.
    q = rms_norm(q, p["q_norm"], eps)
    k = rms_norm(k, p["k_norm"], eps)
    q = apply_rotary(q, cos[:, :, None, :], sin[:, :, None, :])
    k = apply_rotary(k, cos[:, :, None, :], sin[:, :, None, :])
    return q, k, v


def _out_and_mlp(p: dict, x, attn, cfg: Qwen3VLConfig, dtype):
    """Residual attention output projection + MLP block. x (B, T, E), attn (B, T, N, D) -> (B, T, E)."""
    x = x + jnp.einsum("btnh,nhe->bte", attn.astype(dtype), p["o_kernel"].astype(dtype))
    h = rms_norm(x, p["post_attention_norm"], cfg.text.rms_norm_eps).astype(dtype)
    if "router_kernel" in p:  # a sparse layer's slice (run_params): the routed-experts MLP
        return constrain(x + moe.sparse_mlp(h, p, cfg, dtype), ("batch", None, None))
    gate = jnp.dot(h, p["gate_kernel"].astype(dtype))
    up = jnp.dot(h, p["up_kernel"].astype(dtype))
    x = x + jnp.dot(jax.nn.silu(gate) * up, p["down_kernel"].astype(dtype))
    return constrain(x, ("batch", None, None))


def decoder_layer(p: dict, x, cos, sin, mask, cfg: Qwen3VLConfig, dtype):
    """One decoder layer over T tokens attending to themselves (forward and prefill).

    p: one layer's slice of DecoderLayers.stacked(); x (B, T, E); cos/sin (B, T, D) fp32;
    mask (B, 1, T, T) bool (True = may attend) or an attention.MaskSpec (causal + key padding).
    Returns (x (B, T, E), (k, v) (B, T, K, D) this layer's keys/values, for the prefill's cache).
    """
    q, k, v = _qkv(p, x, cos, sin, cfg, dtype)
    # A MaskSpec mask goes through cfg.attention_impl ('chunked': no T x T scores); a dense mask is the XLA path.
    attn = attend(q, k, v, mask, cfg.attention_impl, chunk_size=cfg.attention_chunk_size)
    return _out_and_mlp(p, x, attn, cfg, dtype), (k, v)


def decode_attention(q, k_new, v_new, k_cache, v_cache, valid):
    """Single-query grouped attention over a KV cache plus the query's own key, softmax in fp32.

    q (B, N, D); k_new, v_new (B, K, D) the new token's key/value (not yet in the cache);
    k_cache, v_cache (B, K, S, D); valid (B, S) bool: cache slots to attend (the new token's slot excluded).
    Returns (B, N, D) in q.dtype. GQA as in transformers' repeat_kv: head n reads KV head n // (N / K); q is
    grouped to (B, K, G, D) instead of repeating the cache G times. Same scale as dot_product_attention
    (1 / sqrt(D)). The new key is handled as one extra logit, so the cache is read once and never copied.
    """
    b, n, d = q.shape
    kh = k_cache.shape[1]
    qg = q.reshape(b, kh, n // kh, d)
    scale = d ** -0.5
    s_cache = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache.astype(q.dtype),
                         preferred_element_type=jnp.float32) * scale
    s_cache = jnp.where(valid[:, None, None, :], s_cache, jnp.finfo(jnp.float32).min)
    s_new = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(q.dtype), preferred_element_type=jnp.float32)[..., None]
    s_new = s_new * scale
    m = jnp.maximum(jnp.max(s_cache, axis=-1, keepdims=True), s_new)  # (B, K, G, 1)
    e_cache = jnp.exp(s_cache - m)
    e_new = jnp.exp(s_new - m)
    denom = jnp.sum(e_cache, axis=-1, keepdims=True) + e_new
    out = jnp.einsum("bkgs,bksd->bkgd", e_cache.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    out = (out + e_new * v_new.astype(jnp.float32)[:, :, None, :]) / denom
    return out.reshape(b, n, d).astype(q.dtype)


def decoder_layer_decode(p: dict, x, cos, sin, valid, k_cache, v_cache, cfg: Qwen3VLConfig, dtype):
    """One decoder layer for one new token per row against this layer's cache.

    x (B, 1, E); cos/sin (B, 1, D); valid (B, S); k_cache, v_cache (B, K, S, D).
    Returns (x (B, 1, E), (k_new, v_new) (B, K, D)) — the caller writes them into the cache.
    """
    q, k, v = _qkv(p, x, cos, sin, cfg, dtype)
    attn = decode_attention(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, valid)
    return _out_and_mlp(p, x, attn[:, None], cfg, dtype), (k[:, 0], v[:, 0])


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

    def run_layers(self, x, cos, sin, mask, input_ids, deepstack_embeds=(), return_kv: bool = False):
        """Runs all layers over T tokens. x (B, T, E); mask (B, 1, T, T); deepstack_embeds: tuple of (M, E), added
        at <|image_pad|> positions after layers 0, 1, ... (one feature set per layer).
        Returns (x before the final norm, (k, v) (L, B, T, K, D) when return_kv (prefill) else None)."""
        cfg, dt = self.cfg, self.compute_dtype
        stacked = self.layers.stacked()
        n_ds = len(deepstack_embeds or ())

        def layer(h, p):
            h, kv = decoder_layer(p, h, cos, sin, mask, cfg, dt)
            return h, (kv if return_kv else None)

        layer = maybe_remat(layer, cfg.remat)
        kv_parts = []
        for i in range(n_ds):  # unrolled: each is followed by its deepstack injection
            (run,) = layer_runs(cfg, i, i + 1)
            x, kv = layer(x, jax.tree.map(lambda a: a[0], run_params(stacked, *run)))
            kv_parts.append(None if kv is None else jax.tree.map(lambda a: a[None], kv))
            feat, _ = scatter_rows(input_ids, cfg.image_token_id, deepstack_embeds[i].astype(x.dtype))
            x = x + feat
        for run in layer_runs(cfg, n_ds, cfg.text.num_hidden_layers):
            x, kv = jax.lax.scan(layer, x, run_params(stacked, *run))
            kv_parts.append(kv)
        if not return_kv:
            return x, None
        return x, tuple(jnp.concatenate([part[j] for part in kv_parts], axis=0) for j in range(2))

    def run_layers_decode(self, x, cos, sin, valid, cache_k, cache_v):
        """All layers for one token per row. x (B, 1, E); valid (B, S) slots to attend; cache_k, cache_v
        (L, B, K, S, D) read-only (the scan slices one layer per iteration, no cache-sized outputs).
        Returns (x before the final norm, (k_new, v_new) (L, B, K, D)) for the caller's single cache write."""
        cfg, dt = self.cfg, self.compute_dtype

        def layer(h, xs):
            p, k_l, v_l = xs
            return decoder_layer_decode(p, h, cos, sin, valid, k_l, v_l, cfg, dt)

        stacked = self.layers.stacked()
        runs = layer_runs(cfg, 0, cfg.text.num_hidden_layers)
        if len(runs) == 1:
            return jax.lax.scan(layer, x, (run_params(stacked, *runs[0]), cache_k, cache_v))
        new = []
        for run in runs:  # mixed dense / sparse layers: one scan per run of one kind
            first, end = run[0], run[1]
            x, kv = jax.lax.scan(layer, x, (run_params(stacked, *run), cache_k[first:end], cache_v[first:end]))
            new.append(kv)
        return x, tuple(jnp.concatenate([kv[j] for kv in new], axis=0) for j in range(2))

    def final_norm(self, x):
        return rms_norm(x, self.norm[...], self.cfg.text.rms_norm_eps)
