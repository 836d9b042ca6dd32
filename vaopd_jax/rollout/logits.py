"""Logit processing and token sampling for the rollout sampler (pure, jittable).

One decode step turns the student's next-token logits (B, V) into a token per
row. The processing order and the semantics follow transformers' `generate`
(LogitsProcessorList built by `_get_logits_processor`):

1. rows >= `valid_vocab_size` (LM-head padding beyond the tokenizer) are masked to
   -inf, always, before anything else (docs/method.md: "sampling must never emit them");
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

Speed (one decode step samples B rows over V ~ 152k logits; a full sort or a
Gumbel draw per logit costs more than the model's forward on CPU):
- nucleus without sorting the vocabulary: take the `top_p_candidates` largest
  logits with `lax.top_k`; if, in every row, they hold at least top_p of the
  mass, the nucleus lies inside them and the keep-mask is exact. Otherwise
  (flat distributions, e.g. random models) a `lax.cond` falls back to a binary
  search, over the float bits, for the probability threshold of the nucleus:
  the largest tau with sum(p[p >= tau]) >= top_p, which is the probability of
  the last token HF keeps (with exact ties at that threshold all tied tokens
  are kept, where HF's sort keeps an arbitrary subset);
- the draw is inverse-CDF with ONE uniform per row (a blocked cumulative sum:
  blocks of 128 logits, then within the chosen block), exact up to float
  rounding, instead of one Gumbel variate per logit.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

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
        # Booleans are ints to Python, and NaN fails every comparison: both are refused explicitly.
        def number(value):
            return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)

        def integer(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

        if not (number(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"SamplingParams.temperature={self.temperature!r}: must be a finite number in [0, inf) "
                             "(0 = greedy)")
        if not (integer(self.top_k) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k={self.top_k!r}: must be an int in [0, inf) (0 = off)")
        if not (number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p={self.top_p!r}: must be a number in (0, 1] (1 = off)")
        if not (integer(self.top_p_candidates) and self.top_p_candidates >= 1):
            raise ValueError(f"SamplingParams.top_p_candidates={self.top_p_candidates!r}: must be an int in "
                             "[1, inf)")

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


def _float_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def _nucleus_threshold(probs: jax.Array, top_p: float, upper: jax.Array) -> jax.Array:
    """Largest tau with sum(probs[probs >= tau]) >= top_p, per row. probs (B, V) >= 0; upper (B,) >= tau.

    Binary search over the int32 bit patterns of non-negative floats (monotone in the value); 32 steps give
    the exact float.
    """
    lo = jnp.zeros(probs.shape[:1], jnp.int32)  # tau = 0 keeps everything: mass 1 >= top_p
    hi = _float_bits(upper) + 1  # mass above `upper` is < top_p

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        tau = jax.lax.bitcast_convert_type(mid, jnp.float32)
        ok = jnp.sum(jnp.where(probs >= tau[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def top_p_mask(scaled: jax.Array, top_p: float, num_candidates: int) -> jax.Array:
    """HF TopPLogitsWarper keep-mask over the full vocabulary.

    scaled: (B, V) temperature-scaled logits, already -inf where excluded.
    Returns bool (B, V): True for tokens inside the nucleus.
    """
    batch, vocab = scaled.shape
    log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    rows = jnp.arange(batch)[:, None]
    num = min(num_candidates, vocab)
    cand_logits, cand_idx = jax.lax.top_k(scaled, num)
    keep_cand = _nucleus_keep_sorted(cand_logits, log_norm, top_p) & jnp.isfinite(cand_logits)
    if num == vocab:
        return jnp.zeros((batch, vocab), dtype=bool).at[rows, cand_idx].set(keep_cand)
    covered = jnp.sum(jnp.exp(cand_logits - log_norm), axis=-1) >= top_p

    def from_candidates():
        return jnp.zeros((batch, vocab), dtype=bool).at[rows, cand_idx].set(keep_cand)

    def from_threshold():
        # The nucleus extends past the candidates in some row: exact threshold search over all V.
        probs = jnp.exp(scaled - log_norm)
        tau = _nucleus_threshold(probs, top_p, jnp.exp(cand_logits[:, 0] - log_norm[:, 0]))
        return (probs >= tau[:, None]) & jnp.isfinite(scaled)

    return jax.lax.cond(jnp.all(covered), from_candidates, from_threshold)


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


def inverse_cdf_sample(key: jax.Array | None, probs: jax.Array, block: int = 128,
                       uniform: jax.Array | None = None) -> jax.Array:
    """One draw per row from unnormalized non-negative weights. probs (B, V) → (B,) int32.

    One uniform per row (`jax.random.uniform(key, (B,))`, or the given `uniform` (B,) in [0, 1)); the
    cumulative sum is blocked (sums of `block` weights, then the chosen block) so no length-V scan is needed.
    Zero-weight entries are never returned: a rounding miss falls back to the row's argmax.
    """
    batch, vocab = probs.shape
    padded = -(-vocab // block) * block
    weights = jnp.pad(probs.astype(jnp.float32), ((0, 0), (0, padded - vocab))).reshape(batch, -1, block)
    block_mass = weights.sum(axis=-1)  # (B, nb)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    if uniform is None:
        uniform = jax.random.uniform(key, (batch,), jnp.float32)
    target = uniform * block_cdf[:, -1]
    block_idx = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), block_cdf.shape[1] - 1)
    rows = jnp.arange(batch)
    inside = target - (block_cdf[rows, block_idx] - block_mass[rows, block_idx])
    within_cdf = jnp.cumsum(weights[rows, block_idx], axis=-1)  # (B, block)
    within_idx = jnp.minimum(jnp.sum(within_cdf <= inside[:, None], axis=-1), block - 1)
    tokens = (block_idx * block + within_idx).astype(jnp.int32)
    hit = jnp.take_along_axis(jnp.pad(probs, ((0, 0), (0, padded - vocab))), tokens[:, None], axis=-1)[:, 0] > 0
    return jnp.where(hit, tokens, jnp.argmax(probs, axis=-1).astype(jnp.int32))


def sample_tokens(
    key: jax.Array | None, logits: jax.Array, params: SamplingParams, valid_vocab_size: int | jax.Array | None,
    uniform: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row.

    key: a PRNG key; logits: (B, V) raw student logits. uniform: (B,) draws in [0, 1) used instead of
    `jax.random.uniform(key, (B,))` (the sampler passes one row's share of a larger batch's draw); key may then
    be None, as for greedy decoding.
    Returns (tokens (B,) int32, logprobs (B,) float32 under the sampling
    distribution, model_logprobs (B,) float32 temperature-1 unfiltered).
    """
    raw = mask_invalid_vocab(logits, valid_vocab_size)
    model_log_norm = jax.nn.logsumexp(raw, axis=-1)
    if params.greedy:
        tokens = jnp.argmax(raw, axis=-1).astype(jnp.int32)
        logprobs = jnp.zeros(tokens.shape, jnp.float32)
    else:
        dist_logits = sampling_logits(logits, params, valid_vocab_size)
        log_norm = jax.nn.logsumexp(dist_logits, axis=-1, keepdims=True)
        tokens = inverse_cdf_sample(key, jnp.exp(dist_logits - log_norm), uniform=uniform)
        logprobs = _take(dist_logits, tokens) - log_norm[:, 0]
    return tokens, logprobs, _take(raw, tokens) - model_log_norm
