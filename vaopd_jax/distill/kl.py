"""Chunked full-vocabulary reverse KL and sampled-token log-probs from hidden states.

The memory rule: full-vocabulary logits for a whole batch never exist at
once. These functions take final (normed) hidden states and lm_head kernels and
walk the sequence axis in chunks of ``chunk_size`` positions with ``lax.scan``;
only one chunk's (B, C, V) logits live at a time, in float32 (bf16 matmul
inputs, fp32 accumulation and fp32 softmax/KL). The batch axis stays whole inside
each chunk so that a data-sharded batch keeps every device busy, and a
vocabulary sharded over the tensor axis stays sharded (target log-probs use a
one-hot reduction, not a gather along V).

The KL's backward pass is a custom VJP that recomputes each chunk's logits and
applies the closed form of docs/method.md's reference gradient,
  d KL / d z = p_S * (log p_S - log p_T - KL),
so the backward also holds one chunk of logits at a time plus the (H, V) float32
accumulator of the lm_head gradient. The forward saves, per position, the two
log-normalizers (logsumexp of the student's and the teacher's logits) and the KL
((B, T) float32 each): the backward then needs no softmax (no max / sum over the
vocabulary), only one elementwise pass from the two chunks of logits to the
gradient of the logits, so fewer vocabulary-sized buffers are alive at once.

A sequence of T positions is cut into ceil(T / chunk_size) chunks of equal size
(at most ``chunk_size``), so the padding is less than one position per chunk
(T = 6 with chunk_size 8 is one chunk of 6, not 8).

Vocabulary rows at index >= ``valid_vocab_size`` (lm_head padding beyond the
tokenizer) are excluded from every softmax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vaopd_jax.distill.objective import MASKED_LOGIT

# Response positions per chunk, the one default of every chunked KL / log-prob (config model.kl_chunk_size): a
# chunk's (B, 512, V = 151,936) float32 logits are small beside a step's activations at the paper's sizes, and
# 512 rows keep the LM-head matmul efficient. Tiny vocabularies want smaller chunks (the demo uses 8).
DEFAULT_CHUNK_SIZE = 512


def _balanced_chunk_size(length: int, chunk_size: int) -> int:
    """The size of ceil(length / chunk_size) equal chunks covering ``length`` (<= chunk_size, least padding)."""
    num_chunks = max(-(-length // chunk_size), 1)
    return -(-length // num_chunks)


def _chunk(x: jax.Array, chunk_size: int) -> jax.Array:
    """(B, T, ...) -> (n_chunks, B, C, ...), n_chunks = ceil(T / chunk_size) chunks of C <= chunk_size positions,
    zero-padding T up to n_chunks * C (less than n_chunks positions)."""
    batch, length = x.shape[:2]
    chunk_size = _balanced_chunk_size(length, chunk_size)
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x: jax.Array, length: int) -> jax.Array:
    """(n_chunks, B, C, ...) -> (B, T, ...), dropping the padding."""
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
    return x[:, :length]


def _logits(hidden: jax.Array, kernel: jax.Array, valid_vocab_size: int | None) -> jax.Array:
    """(B, C, H) @ (H, V) -> (B, C, V) float32 logits with padded vocabulary rows masked."""
    logits = jnp.einsum("bch,hv->bcv", hidden, kernel, preferred_element_type=jnp.float32)
    vocab = kernel.shape[-1]
    if valid_vocab_size is not None and valid_vocab_size < vocab:
        logits = jnp.where(jnp.arange(vocab) < valid_vocab_size, logits, MASKED_LOGIT)
    return logits


def _pick(logp: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target): (B, C, V), (B, C) -> (B, C), as a one-hot reduction (shards over V)."""
    vocab_ids = jnp.arange(logp.shape[-1], dtype=targets.dtype)
    return jnp.where(vocab_ids == targets[..., None], logp, 0.0).sum(-1)


def _check_targets(targets, vocab: int, valid_vocab_size: int | None) -> None:
    """Concrete targets must be token ids of the valid vocabulary: an id outside it would silently give a
    log-prob of 0 (no one-hot match) or of a padded row (-1e30). Traced targets (inside jit) are not checked."""
    if valid_vocab_size is not None and not (isinstance(valid_vocab_size, (int, np.integer)) and valid_vocab_size >= 1):
        raise ValueError(f"valid_vocab_size={valid_vocab_size!r} must be an int >= 1 (or None)")
    if isinstance(targets, jax.core.Tracer) or np.size(targets) == 0:
        return
    limit = vocab if valid_vocab_size is None else min(vocab, int(valid_vocab_size))
    values = np.asarray(targets)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {values.dtype}")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= limit:
        raise ValueError(f"targets hold token ids in [{low}, {high}]; allowed [0, {limit}) (the valid vocabulary)")


def _check(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, chunk_size):
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; must be an int >= 1")
    if student_kernel.shape[-1] != teacher_kernel.shape[-1]:
        raise ValueError(f"student vocab {student_kernel.shape[-1]} != teacher vocab {teacher_kernel.shape[-1]}: "
                         "the KL needs one shared vocabulary")
    if student_hidden.shape[:2] != targets.shape or teacher_hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden states {student_hidden.shape} / {teacher_hidden.shape} must be (B, T, H) with "
                         f"(B, T) = targets.shape {targets.shape}")
    if student_hidden.shape[-1] != student_kernel.shape[0] or teacher_hidden.shape[-1] != teacher_kernel.shape[0]:
        raise ValueError(f"hidden sizes {student_hidden.shape[-1]}, {teacher_hidden.shape[-1]} do not match the "
                         f"lm_head kernels {student_kernel.shape}, {teacher_kernel.shape} (expected (H, V))")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kl_core(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, valid_vocab_size,
             chunk_size):
    return _kl_forward(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets,
                       valid_vocab_size, chunk_size)


def _kl_chunks(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, valid_vocab_size,
               chunk_size):
    """Per position: KL (Eq. 1), log p_T(target), log p_S(target) and the two log-normalizers, all (B, T)."""
    length = targets.shape[1]

    def body(_, chunk):
        h_s, h_t, tgt = chunk
        logits_s = _logits(h_s, student_kernel, valid_vocab_size)
        logits_t = _logits(h_t, teacher_kernel, valid_vocab_size)
        lse_s = jax.nn.logsumexp(logits_s, axis=-1)
        lse_t = jax.nn.logsumexp(logits_t, axis=-1)
        # Eq. 1 with log p = z - logsumexp(z): sum_v p_S (z_S - z_T) - lse_S + lse_T, so that no (B, C, V)
        # log-prob array is written besides the two logits (p_S = 0 on padded rows, where z_S = z_T).
        p_s = jnp.exp(logits_s - lse_s[..., None])
        kl = (p_s * (logits_s - logits_t)).sum(-1) - lse_s + lse_t
        return None, (kl, _pick(logits_t, tgt) - lse_t, _pick(logits_s, tgt) - lse_s, lse_s, lse_t)

    chunks = (_chunk(student_hidden, chunk_size), _chunk(teacher_hidden, chunk_size), _chunk(targets, chunk_size))
    _, outs = jax.lax.scan(body, None, chunks)
    return tuple(_unchunk(o, length) for o in outs)


def _kl_forward(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, valid_vocab_size,
                chunk_size):
    return _kl_chunks(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, valid_vocab_size,
                      chunk_size)[:3]


def _kl_fwd(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, valid_vocab_size, chunk_size):
    kl, logp_t, logp_s, lse_s, lse_t = _kl_chunks(student_hidden, student_kernel, teacher_hidden, teacher_kernel,
                                                  targets, valid_vocab_size, chunk_size)
    # (B, T) residuals: the backward rebuilds log p = logits - logsumexp without another softmax.
    return (kl, logp_t, logp_s), (student_hidden, student_kernel, teacher_hidden, teacher_kernel, lse_s, lse_t, kl)


def _kl_bwd(valid_vocab_size, chunk_size, residuals, cotangents):
    student_hidden, student_kernel, teacher_hidden, teacher_kernel, lse_s, lse_t, kl = residuals
    g_kl = cotangents[0]  # the two log-prob outputs are stop-gradient (see token_kl_and_logprobs)
    length = g_kl.shape[1]
    kernel_f32 = student_kernel.astype(jnp.float32)

    def body(grad_kernel, chunk):
        h_s, h_t, g, lse_s_c, lse_t_c, kl_c = chunk
        logp_s = _logits(h_s, student_kernel, valid_vocab_size) - lse_s_c[..., None]
        logp_t = _logits(h_t, teacher_kernel, valid_vocab_size) - lse_t_c[..., None]
        # docs/method.md: dKL/dz = p_S * (log p_S - log p_T - KL); p_S = 0 on padded vocabulary rows. One elementwise
        # pass over the two chunks of logits. Positions with a zero cotangent (off the response mask) are
        # selected out, not multiplied by 0: a NaN or inf in their hidden states must not reach the gradient.
        counted = (g != 0)[..., None]
        grad_logits = jnp.where(counted, (g[..., None] * jnp.exp(logp_s)) * (logp_s - logp_t - kl_c[..., None]), 0.0)
        grad_hidden = jnp.einsum("bcv,hv->bch", grad_logits, kernel_f32)
        h_s = jnp.where(counted, h_s.astype(jnp.float32), 0.0)
        grad_kernel = grad_kernel + jnp.einsum("bch,bcv->hv", h_s, grad_logits)
        return grad_kernel, grad_hidden.astype(student_hidden.dtype)

    chunks = tuple(_chunk(x, chunk_size) for x in (student_hidden, teacher_hidden, g_kl.astype(jnp.float32),
                                                   lse_s, lse_t, kl))
    grad_kernel0 = jnp.zeros(student_kernel.shape, jnp.float32)
    grad_kernel, grad_hidden = jax.lax.scan(body, grad_kernel0, chunks)
    return (_unchunk(grad_hidden, length), grad_kernel.astype(student_kernel.dtype), None, None, None)


_kl_core.defvjp(_kl_fwd, _kl_bwd)


def token_kl_and_logprobs(student_hidden: jax.Array, student_kernel: jax.Array, teacher_hidden: jax.Array,
                          teacher_kernel: jax.Array, targets: jax.Array, *, valid_vocab_size: int | None = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-position reverse KL(p_S || p_T) (Eq. 1) and sampled-token log-probs, chunked.

    Position t of the hidden states is the one that predicts ``targets[:, t]``.
    Differentiable w.r.t. ``student_hidden`` and ``student_kernel`` only (the
    teacher is frozen); the log-prob outputs are stop-gradient.

    Args:
      student_hidden: (B, T, Hs) final-normed student hidden states (any float dtype).
      student_kernel: (Hs, V) student lm_head kernel.
      teacher_hidden: (B, T, Ht) teacher hidden states, original image.
      teacher_kernel: (Ht, V) teacher lm_head kernel.
      targets: (B, T) int32 sampled tokens.
      valid_vocab_size: rows >= this are lm_head padding, excluded (None: all rows real).
      chunk_size: positions per chunk; need not divide T.
    Returns:
      kl (B, T) float32, teacher_logp (B, T) float32 = log p_T(target | original image),
      student_logp (B, T) float32 = log p_S(target).
    """
    _check(student_hidden, student_kernel, teacher_hidden, teacher_kernel, targets, chunk_size)
    _check_targets(targets, student_kernel.shape[-1], valid_vocab_size)
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_kernel = jax.lax.stop_gradient(teacher_kernel)
    kl, teacher_logp, student_logp = _kl_core(student_hidden, student_kernel, teacher_hidden, teacher_kernel,
                                              targets.astype(jnp.int32), valid_vocab_size, chunk_size)
    return kl, jax.lax.stop_gradient(teacher_logp), jax.lax.stop_gradient(student_logp)


def token_logprobs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *,
                   valid_vocab_size: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Chunked log p(target) at every position (e.g. the teacher on the pixelated view), stop-gradient.

    Args:
      hidden: (B, T, H) final-normed hidden states; kernel: (H, V); targets: (B, T) int.
    Returns:
      (B, T) float32 log-probs of ``targets`` under softmax(hidden @ kernel) over the valid vocabulary.
    """
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; must be an int >= 1")
    if hidden.shape[:2] != targets.shape or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(f"hidden {hidden.shape} / kernel {kernel.shape} / targets {targets.shape}: "
                         "expected (B, T, H), (H, V), (B, T)")
    _check_targets(targets, kernel.shape[-1], valid_vocab_size)
    hidden = jax.lax.stop_gradient(hidden)
    kernel = jax.lax.stop_gradient(kernel)
    targets = targets.astype(jnp.int32)

    def body(_, chunk):
        h, tgt = chunk
        logits = _logits(h, kernel, valid_vocab_size)
        return None, _pick(logits, tgt) - jax.nn.logsumexp(logits, axis=-1)  # no (B, C, V) log-prob array

    _, logp = jax.lax.scan(body, None, (_chunk(hidden, chunk_size), _chunk(targets, chunk_size)))
    return _unchunk(logp, targets.shape[1])
