"""Full-sequence attention without (T x S) score matrices for the whole sequence: query-chunked, exact.

`jax.nn.dot_product_attention(implementation=None)` on the XLA path materializes (B, N, T, S) fp32 scores (and,
under grad, keeps them for the backward pass). At paper scale (5,120 tokens, 32-64 heads) that is tens of GB per
device per layer. `chunked_attention` computes the same result one block of `chunk_size` queries at a time
inside a `lax.scan`; each block is wrapped in `jax.checkpoint`, so the backward pass recomputes that block's
scores instead of storing them. Peak attention memory is (B, N, chunk_size, S) fp32 instead of (B, N, T, S).

The mask is given structurally (`MaskSpec`: causal flag, key padding, segment ids), so no (B, 1, T, S) mask
array exists either; each block builds its own (B, 1, 1, chunk_size, S) slice.

    out = attend(q, k, v, MaskSpec(causal=True, key_valid=attention_mask), impl="chunked", chunk_size=512)

impl: 'xla' (dense mask + jax.nn.dot_product_attention, the reference path), 'chunked' (this module, any
backend), 'cudnn' (jax.nn.dot_product_attention(implementation='cudnn'), NVIDIA GPUs only; key padding must be
right padding, as the model's attention_mask is).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .config import ATTENTION_IMPLS  # one list, validated in config.validate


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys a query may attend to, without a (T, S) array.

    causal:      static bool: query i sees keys j <= i (self-attention, T == S, same index space).
    key_valid:   (B, S) bool or None: False keys (padding) are hidden from every query.
    segment_ids: (B, T) int or None: self-attention only between equal ids (vision: one id per image frame,
                 transformers' cu_seqlens blocks).
    Queries that see no key at all get the mean of all values, as jax.nn.dot_product_attention's masked softmax.
    """

    key_valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def dense(self, batch: int, t: int, s: int) -> jax.Array:
        """(B, 1, T, S) bool mask for the 'xla' reference path."""
        mask = jnp.ones((batch, 1, t, s), bool)
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((t, s), bool))[None, None]
        if self.key_valid is not None:
            mask = mask & self.key_valid.astype(bool)[:, None, None, :]
        if self.segment_ids is not None:
            seg = self.segment_ids
            mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
        return mask


def _large_negative(dtype):
    # Same fill value as jax.nn.dot_product_attention's masked softmax (so fully masked rows agree too).
    return jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)


def _block(q_blk, q_idx, q_seg, k, v, key_valid, kv_seg, causal: bool, scale: float):
    """One query block. q_blk (B, C, K, G, D); q_idx (C,) int; q_seg (B, C) or None; k, v (B, S, K, D).

    Returns (B, C, K, G, D). GQA: the G query heads of one KV head share it through the einsum (no repeat)."""
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_blk.dtype == jnp.bfloat16 else None
    logits = jnp.einsum("bckgd,bskd->bkgcs", q_blk, k, precision=precision,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    s = k.shape[1]
    allowed = jnp.ones((q_blk.shape[0], 1, 1, q_blk.shape[1], s), bool)
    if causal:
        allowed = allowed & (jnp.arange(s)[None, :] <= q_idx[:, None])[None, None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, None, :]
    if q_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
    logits = jnp.where(allowed, logits, _large_negative(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # fp32 softmax, values in the compute dtype
    return jnp.einsum("bkgcs,bskd->bckgd", probs, v)


def chunked_attention(q, k, v, mask: MaskSpec | None = None, *, chunk_size: int = 512):
    """Exact softmax attention, `chunk_size` queries at a time.

    q (B, T, N, D); k, v (B, S, K, D) with N a multiple of K (GQA); mask: MaskSpec or None (no mask).
    Scale 1/sqrt(D), fp32 logits and softmax. Returns (B, T, N, D) in q's dtype. T need not be a multiple of
    chunk_size (queries are padded to one and the padding rows dropped).
    """
    mask = mask or MaskSpec()
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n} must be a multiple of key/value heads {kh}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mask.causal and t != s:
        raise ValueError(f"causal MaskSpec needs T == S (self-attention), got T={t}, S={s}")
    c = min(chunk_size, t)
    num_chunks = -(-t // c)
    pad = num_chunks * c - t
    key_valid = None if mask.key_valid is None else mask.key_valid.astype(bool)
    seg = mask.segment_ids
    qg = q.reshape(b, t, kh, n // kh, d)
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        if seg is not None:
            seg = jnp.pad(seg, ((0, 0), (0, pad)))
    # Chunks on the leading (scanned) axis: (num_chunks, B, C, K, G, D).
    q_chunks = jnp.moveaxis(qg.reshape(b, num_chunks, c, kh, n // kh, d), 1, 0)
    idx_chunks = jnp.arange(num_chunks * c, dtype=jnp.int32).reshape(num_chunks, c)
    seg_chunks = None if seg is None else jnp.moveaxis(seg.reshape(b, num_chunks, c), 1, 0)
    kv_seg = None if mask.segment_ids is None else mask.segment_ids
    scale = 1.0 / math.sqrt(d)

    # jax.checkpoint: the backward pass recomputes this block's (B, N, C, S) scores rather than saving them.
    @jax.checkpoint
    def one(q_blk, q_idx, q_seg, k_, v_, key_valid_, kv_seg_):
        return _block(q_blk, q_idx, q_seg, k_, v_, key_valid_, kv_seg_, mask.causal, scale)

    def body(carry, xs):
        q_blk, q_idx, q_seg = xs
        return carry, one(q_blk, q_idx, q_seg, k, v, key_valid, kv_seg)

    _, out = jax.lax.scan(body, None, (q_chunks, idx_chunks, seg_chunks))
    out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * c, n, d)
    return out[:, :t].astype(q.dtype)


def attend(q, k, v, mask, impl: str = "xla", *, chunk_size: int = 512):
    """Full-sequence attention dispatch. q (B, T, N, D); k, v (B, S, K, D) -> (B, T, N, D).

    mask: a dense (B, 1, T, S) bool array (always the 'xla' path: the KV-cache decode callers pass one) or a
    MaskSpec (routed by impl: 'xla' | 'chunked' | 'cudnn').
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if not isinstance(mask, MaskSpec):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask, chunk_size=chunk_size)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if impl == "cudnn":
        if mask.segment_ids is not None:
            # cuDNN has no segment mask type, and its dense-mask form fails under vmap (the train step and the
            # sampler vmap the vision tower over prompts: "cannot reshape (16, 1, 1, T, T) into (16, 16, T, T)",
            # found compiling for h100x8): the vision tower's attention takes the chunked kernel.
            return chunked_attention(q, k, v, mask, chunk_size=chunk_size)
        lengths = None
        if mask.key_valid is not None:  # right padding: the valid keys are a prefix of length sum(valid)
            lengths = jnp.sum(mask.key_valid.astype(jnp.int32), axis=1)
        return jax.nn.dot_product_attention(q, k, v, is_causal=mask.causal, key_value_seq_lengths=lengths,
                                            implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(b, t, s), implementation=None)
