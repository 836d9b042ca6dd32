"""Logit processing and token sampling for the rollout sampler (pure, jittable).

One decode step turns the student's next-token logits (B, V) into a token per
row. The processing order and the semantics follow transformers' `generate`
(LogitsProcessorList built by `_get_logits_processor`):

1. rows >= `valid_vocab_size` (LM-head padding beyond the tokenizer) are masked to
   -inf, always, before anything else (METHOD.md: "sampling must never emit them");
2. temperature == 0 means greedy: argmax of the raw logits (HF `do_sample=False`
   ignores temperature, top-k and top-p);
3. otherwise logits / temperature (TemperatureLogitsWarper), then
4. top-k (TopKLogitsWarper): keep tokens whose scaled logit is >= the k-th largest
   value (ties at the boundary are kept, as in HF), then
5. top-p (TopPLogitsWarper, nucleus): on the distribution left after steps 3-4,
   keep the smallest set of most likely tokens whose cumulative probability is
   >= top_p; the most likely token is always kept. A token is kept iff the
   probability mass strictly ahead of it (in descending order) is < top_p.

Log-probabilities returned per sampled token (decided once, used everywhere):
- `logprobs`: log-prob of the token under the distribution it was drawn from
  (after steps 1-5). For greedy decoding that distribution is a point mass, so
  the value is 0.
- `model_logprobs`: the student's own temperature-1, unfiltered log-prob of the
  token (log-softmax of the raw logits over the valid vocabulary rows). This is
  the quantity the train step recomputes from a student forward pass; at
  temperature 1, top-k 0, top-p 1 the two coincide.

Nucleus filtering without sorting the whole vocabulary every step: take the
`top_p_candidates` largest logits with `lax.top_k`; if, in every row, they hold
at least top_p of the probability mass the nucleus lies inside them and the
keep-mask is exact. Otherwise (flat distributions, e.g. random models) a
`lax.cond` falls back to a full-vocabulary sort, which gives the same mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: part of the compiled program's key).

    temperature: 0 → greedy; > 0 → sample from softmax(logits / temperature).
    top_k: 0 → off; k >= 1 → keep the k largest logits (HF tie semantics).
    top_p: 1.0 → off; (0, 1) → nucleus sampling (HF semantics).
    top_p_candidates: how many top logits the nucleus search looks at before
      falling back to a full sort (a speed knob only; results do not depend on it).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    top_p_candidates: int = 256

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy); got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0 = off); got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p!r}")
        if not (isinstance(self.top_p_candidates, int) and self.top_p_candidates >= 1):
            raise ValueError(f"top_p_candidates must be an int >= 1; got {self.top_p_candidates!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def mask_invalid_vocab(logits: jax.Array, valid_vocab_size: int | jax.Array | None) -> jax.Array:
    """Set LM-head padding rows (index >= valid_vocab_size) to -inf.

    logits: (B, V) → (B, V) float32. valid_vocab_size: None (no padding rows), an int, or a traced int32
    scalar (the sampler passes it as data so that it is not part of the compiled program's key).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if valid_vocab_size is None or (isinstance(valid_vocab_size, int) and valid_vocab_size >= vocab):
        return logits
    valid = jnp.arange(vocab) < valid_vocab_size
    return jnp.where(valid, logits, NEG_INF)


def top_k_mask(scaled: jax.Array, top_k: int) -> jax.Array:
    """HF TopKLogitsWarper: keep logits >= the k-th largest value. (B, V) → bool (B, V)."""
    vocab = scaled.shape[-1]
    k = min(top_k, vocab)
    kth = jax.lax.top_k(scaled, k)[0][..., -1:]
    return scaled >= kth


def _nucleus_keep_sorted(sorted_logits: jax.Array, log_norm: jax.Array, top_p: float) -> jax.Array:
    """Keep flags for descending-sorted logits: mass strictly ahead < top_p. (B, C) → bool (B, C)."""
    probs = jnp.exp(sorted_logits - log_norm)
    mass_ahead = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_ahead < top_p
    # The most likely token is always kept (HF min_tokens_to_keep = 1), even when
    # rounding puts top_p at ~0.
    return keep.at[..., 0].set(True)


def top_p_mask(scaled: jax.Array, top_p: float, num_candidates: int) -> jax.Array:
    """HF TopPLogitsWarper keep-mask over the full vocabulary.

    scaled: (B, V) temperature-scaled logits, already -inf where excluded.
    Returns bool (B, V): True for tokens inside the nucleus.
    """
    batch, vocab = scaled.shape
    log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    rows = jnp.arange(batch)[:, None]

    def keep_from(num: int):
        cand_logits, cand_idx = jax.lax.top_k(scaled, num)
        keep_cand = _nucleus_keep_sorted(cand_logits, log_norm, top_p)
        keep_cand = keep_cand & jnp.isfinite(cand_logits)
        mask = jnp.zeros((batch, vocab), dtype=bool).at[rows, cand_idx].set(keep_cand)
        covered = jnp.sum(jnp.exp(cand_logits - log_norm), axis=-1) >= top_p
        return mask, covered

    num = min(num_candidates, vocab)
    if num == vocab:
        return keep_from(vocab)[0]
    mask, covered = keep_from(num)
    # Exactness: if some row's nucleus extends past the candidates, redo all rows
    # with the full sort (same ordering rule, so the same mask where covered).
    return jax.lax.cond(jnp.all(covered), lambda: mask, lambda: keep_from(vocab)[0])


def sampling_logits(logits: jax.Array, params: SamplingParams, valid_vocab_size: int | None) -> jax.Array:
    """The logits of the distribution a token is drawn from (steps 1, 3-5 above).

    logits: (B, V) raw student logits → (B, V) float32, -inf outside the support.
    Not used for greedy decoding.
    """
    scaled = mask_invalid_vocab(logits, valid_vocab_size) / params.temperature
    if params.top_k > 0:
        scaled = jnp.where(top_k_mask(scaled, params.top_k), scaled, NEG_INF)
    if params.top_p < 1.0:
        scaled = jnp.where(top_p_mask(scaled, params.top_p, params.top_p_candidates), scaled, NEG_INF)
    return scaled


def _take(values: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(values, tokens[:, None], axis=-1)[:, 0]


def sample_tokens(
    key: jax.Array, logits: jax.Array, params: SamplingParams, valid_vocab_size: int | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row.

    key: a PRNG key; logits: (B, V) raw student logits.
    Returns (tokens (B,) int32, logprobs (B,) float32 under the sampling
    distribution, model_logprobs (B,) float32 temperature-1 unfiltered).
    """
    raw = mask_invalid_vocab(logits, valid_vocab_size)
    model_logp_all = jax.nn.log_softmax(raw, axis=-1)
    if params.greedy:
        tokens = jnp.argmax(raw, axis=-1).astype(jnp.int32)
        logprobs = jnp.zeros(tokens.shape, jnp.float32)
    else:
        dist_logits = sampling_logits(logits, params, valid_vocab_size)
        tokens = jax.random.categorical(key, dist_logits, axis=-1).astype(jnp.int32)
        logprobs = _take(jax.nn.log_softmax(dist_logits, axis=-1), tokens)
    return tokens, logprobs, _take(model_logp_all, tokens)
