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
from .sharding import constrain, target_platform


class KVCache(NamedTuple):
    """Preallocated decoder KV cache (a pytree).

    k, v  (L, B, K, S, D) compute dtype: per layer keys (after q/k-norm and MRoPE) and values. Heads before
          slots, so the single-query decode attention reads each (row, head)'s slots as one contiguous run of
          (slots, D), block by block up to the filled length (`cached_attention`), with no transpose or GQA
          repeat of the cache per step.
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


def gather_rows(x, rows, row_groups: int = 1):
    """x (B, ...) -> x[rows] (R', ...), each group of rows gathered within its own slice of the batch.

    rows (R',) int32 indices into the B rows; the batch is split into `row_groups` equal contiguous groups and
    entry e (of group e // (R' / row_groups)) must index a row of that same group. With the groups being the
    batch shards of a mesh, the gather is local to each device (a batched gather over the groups), never a
    collective. Out-of-range indices are clamped.
    """
    b = x.shape[0]
    if row_groups == 1:
        return jnp.take(x, rows, axis=0, mode="clip")
    per_group, picked = b // row_groups, rows.shape[0] // row_groups
    local = rows.reshape(row_groups, picked) - (jnp.arange(row_groups) * per_group)[:, None]
    grouped = x.reshape(row_groups, per_group, *x.shape[1:])
    idx = jnp.clip(local, 0, per_group - 1).reshape(row_groups, picked, *([1] * (x.ndim - 1)))
    return jnp.take_along_axis(grouped, idx, axis=1).reshape(rows.shape[0], *x.shape[1:])


def cached_attention(q, k_new, v_new, cache_k, cache_v, valid, layer, filled, *, rows=None, row_groups: int = 1,
                     block_size: int = 128, chunk_bytes: int | None = None):
    """Single-query grouped attention over the filled part of one layer of a KV cache plus the query's own key.

    q (R', N, D) one query per row; k_new, v_new (R', K, D) its own key/value (not yet in the cache); cache_k,
    cache_v (L, B, K, S, D) the stacked cache; valid (B, S) bool; layer: scalar int, the cache layer read;
    filled: scalar int, only slots < filled are candidates (the cost follows it, not S); rows (R',) int32: the
    cache row of each query row (None: R' == B, row i reads cache row i), gathered per `row_groups`
    (`gather_rows`).
    Returns (R', N, D) in q.dtype. GQA as in transformers' repeat_kv: head n reads KV head n // (N / K); q is
    grouped to (R', K, G, D) instead of repeating the cache G times. Scale 1 / sqrt(D), fp32 scores, softmax
    and weighted sum.

    The slots are read in blocks of `block_size` inside a loop whose trip count is ceil(filled / block_size):
    an online (running max) softmax over the blocks, started from the query's own key, which is always valid.
    chunk_bytes: the rows are taken a chunk at a time (a `lax.map`, each chunk inside one batch shard) so that
    one block of keys is at most about this many bytes; None: 2 MB on CPU, where a block that stays in the L2
    cache makes the attention ~1.5x faster, and all rows at once on accelerators.
    """
    r = q.shape[0]
    _, b, kh, s, d = cache_k.shape
    block = min(block_size, s)
    if chunk_bytes is None and target_platform() == "cpu":
        chunk_bytes = 2 << 20
    per_group = r // row_groups
    chunk = per_group
    if chunk_bytes is not None:
        limit = max(1, chunk_bytes // (kh * block * d * cache_k.dtype.itemsize))
        chunk = max(c for c in range(1, per_group + 1) if per_group % c == 0 and c <= limit)
    if chunk == per_group:
        return _attend_blocks(q, k_new, v_new, cache_k, cache_v, valid, layer, filled, rows, row_groups, block)
    # Chunk j holds rows j*chunk .. (j+1)*chunk - 1 of every group: (G, n, c, ...) -> (n, G * c, ...).
    n_chunks = per_group // chunk
    split = lambda x: jnp.swapaxes(x.reshape(row_groups, n_chunks, chunk, *x.shape[1:]), 0, 1).reshape(  # noqa: E731
        n_chunks, row_groups * chunk, *x.shape[1:])
    all_rows = jnp.arange(r, dtype=jnp.int32) if rows is None else rows

    def one_chunk(xs):
        q_c, k_c, v_c, rows_c = xs
        return _attend_blocks(q_c, k_c, v_c, cache_k, cache_v, valid, layer, filled, rows_c, row_groups, block)

    out = jax.lax.map(one_chunk, (split(q), split(k_new), split(v_new), split(all_rows)))
    return jnp.swapaxes(out.reshape(n_chunks, row_groups, chunk, *q.shape[1:]), 0, 1).reshape(q.shape)


def _attend_blocks(q, k_new, v_new, cache_k, cache_v, valid, layer, filled, rows, row_groups: int, block_size: int):
    """`cached_attention` for one chunk of rows: all of their blocks in one loop."""
    r, n, d = q.shape
    _, b, kh, s, _ = cache_k.shape
    g = n // kh
    block = min(block_size, s)
    scale = d ** -0.5
    f32 = jnp.float32
    qg = q.reshape(r, kh, g, d)
    # fp32: scores and weighted sums as multiply + reduce (on XLA:CPU a little faster than the batched dots). Any
    # other dtype: dots with fp32 accumulation, because an elementwise convert of the cache would be hoisted out
    # of the block loop as a convert of the whole cache.
    fused = cache_k.dtype == f32 and q.dtype == f32

    def scores_of(k_blk):  # (R', K, block, D) -> (R', K, G, block) fp32, unscaled
        if fused:
            return jnp.sum(qg[:, :, :, None, :] * k_blk[:, :, None, :, :], axis=-1)
        return jnp.einsum("bkgd,bksd->bkgs", qg, k_blk.astype(q.dtype), preferred_element_type=f32)

    def weighted_sum(p, v_blk):  # p (R', K, G, block) fp32 (in the cache dtype for the dot), v_blk (R', K, block, D)
        if fused:
            return jnp.sum(p[..., None] * v_blk[:, :, None, :, :], axis=-2)
        return jnp.einsum("bkgs,bksd->bkgd", p.astype(v_blk.dtype), v_blk, preferred_element_type=f32)

    m = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(q.dtype), preferred_element_type=f32) * scale  # running max
    denom = jnp.ones_like(m)
    acc = jnp.broadcast_to(v_new.astype(f32)[:, :, None, :], (r, kh, g, d))
    valid_rows = valid if rows is None else gather_rows(valid, rows, row_groups)  # (R', S)

    def read(cache, start):  # (R', K, block, D) of `layer`, slots [start, start + block)
        part = jax.lax.dynamic_slice(cache, (layer, 0, 0, start, 0), (1, b, kh, block, d))[0]
        return part if rows is None else gather_rows(part, rows, row_groups)

    def one_block(j, carry):
        m, denom, acc = carry
        nominal = j * block
        start = jnp.minimum(nominal, s - block)  # the last block may overlap the previous one: mask the overlap
        slot = start + jnp.arange(block)
        ok = jax.lax.dynamic_slice_in_dim(valid_rows, start, block, axis=1) & ((slot >= nominal) & (slot < filled))
        k_blk, v_blk = read(cache_k, start), read(cache_v, start)
        scores = jnp.where(ok[:, None, None, :], scores_of(k_blk) * scale, -jnp.inf)  # (R', K, G, block)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        return m_new, denom * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + weighted_sum(p, v_blk)

    num_blocks = (jnp.asarray(filled, jnp.int32) + block - 1) // block
    m, denom, acc = jax.lax.fori_loop(0, num_blocks, one_block, (m, denom, acc))
    return (acc / denom[..., None]).reshape(r, n, d).astype(q.dtype)


def decode_attention(q, k_new, v_new, k_cache, v_cache, valid, *, block_size: int = 128):
    """`cached_attention` over one layer's whole cache: q (B, N, D); k_new, v_new (B, K, D); k_cache, v_cache
    (B, K, S, D); valid (B, S) bool, the cache slots to attend. Returns (B, N, D) in q.dtype."""
    return cached_attention(q, k_new, v_new, k_cache[None], v_cache[None], valid, 0, k_cache.shape[2],
                            block_size=block_size)


def decoder_layer_decode(p: dict, x, cos, sin, cache: "KVCache", layer, filled, cfg: Qwen3VLConfig, dtype, *,
                         rows=None, row_groups: int = 1, block_size: int = 128):
    """One decoder layer for one new token per row against layer `layer` of the stacked cache.

    x (R', 1, E); cos/sin (R', 1, D); cache: the whole KVCache (read only, slots < filled); rows / row_groups:
    see `cached_attention`. Returns (x (R', 1, E), (k_new, v_new) (R', K, D)) — the caller writes them into the
    cache.
    """
    q, k, v = _qkv(p, x, cos, sin, cfg, dtype)
    attn = cached_attention(q[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, cache.valid, layer, filled, rows=rows,
                            row_groups=row_groups, block_size=block_size)
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
        # One scan per run of one MLP kind over the FULL parameter stacks (a dense model or an all-MoE one: one
        # scan over every layer). The deepstack features are added after layers 0 .. n_ds-1 inside the scan (a
        # cond on the layer index) rather than by unrolling those layers: a scan over layers [n_ds, L) would take
        # a slice of every stacked parameter, which XLA materializes as a copy of the weights (1.7 GB per device
        # for an 8B teacher on 8 devices, the GPU compiler's peak; bench.step --part aot). The features ride in
        # the carry so their gradient accumulates in place.
        ds = (jnp.stack([d.astype(x.dtype) for d in deepstack_embeds]) if n_ds else
              jnp.zeros((1, 1, x.shape[-1]), x.dtype))

        def inject(h, ds, index):
            feat, _ = scatter_rows(input_ids, cfg.image_token_id,
                                   jax.lax.dynamic_index_in_dim(ds, jnp.minimum(index, n_ds - 1), keepdims=False))
            return h + feat

        def body(carry, xs):
            h, ds = carry
            p, index = xs
            h, kv = layer(h, p)
            if n_ds:
                h = jax.lax.cond(index < n_ds, inject, lambda h, ds, index: h, h, ds, index)
            return (h, ds), kv

        kv_parts = []
        for run in layer_runs(cfg, 0, cfg.text.num_hidden_layers):
            indices = jnp.arange(run[0], run[1], dtype=jnp.int32)
            (x, ds), kv = jax.lax.scan(body, (x, ds), (run_params(stacked, *run), indices))
            kv_parts.append(kv)
        if not return_kv:
            return x, None
        if len(kv_parts) == 1:
            return x, kv_parts[0]
        return x, tuple(jnp.concatenate([part[j] for part in kv_parts], axis=0) for j in range(2))

    def run_layers_decode(self, x, cos, sin, cache: KVCache, filled, *, rows=None, row_groups: int = 1,
                          block_size: int = 128):
        """All layers for one token per row. x (R', 1, E); cache: the stacked KVCache, read only (each layer reads
        its slots < filled, block by block, from the whole stacked arrays: no per-layer copy); rows / row_groups:
        see `cached_attention`. Returns (x before the final norm, (k_new, v_new) (L, R', K, D)) for the caller's
        single cache write."""
        cfg, dt = self.cfg, self.compute_dtype

        def layer(h, xs):
            p, index = xs
            return decoder_layer_decode(p, h, cos, sin, cache, index, filled, cfg, dt, rows=rows,
                                        row_groups=row_groups, block_size=block_size)

        stacked = self.layers.stacked()
        runs = layer_runs(cfg, 0, cfg.text.num_hidden_layers)
        new = []
        for run in runs:  # mixed dense / sparse layers: one scan per run of one kind; the cache index is global
            first, end = run[0], run[1]
            x, kv = jax.lax.scan(layer, x, (run_params(stacked, *run), jnp.arange(first, end, dtype=jnp.int32)))
            new.append(kv)
        if len(new) == 1:
            return x, new[0]
        return x, tuple(jnp.concatenate([kv[j] for kv in new], axis=0) for j in range(2))

    def final_norm(self, x):
        return rms_norm(x, self.norm[...], self.cfg.text.rms_norm_eps)
