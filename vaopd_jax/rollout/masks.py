"""Response masks and lengths for generated tokens (pure, jittable).

Rules (docs/method.md, "Masks and edge rules"):
- the response mask covers generated tokens up to AND including the first end
  token; tokens after it are excluded;
- a response that reaches the length limit without an end token keeps all of
  its tokens;
- several end-token ids may be given (Qwen3-VL: <|im_end|> 151645 and
  <|endoftext|> 151643).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_end_token(tokens: jax.Array, eos_token_ids: Sequence[int] | jax.Array) -> jax.Array:
    """tokens (...) int → bool (...): True where the token is any end token.

    eos_token_ids: a sequence of ints or an (E,) int array (E may be 0: nothing ends).
    """
    if not isinstance(eos_token_ids, (jax.Array, np.ndarray)):
        eos_token_ids = np.asarray(tuple(eos_token_ids), dtype=np.int32)
    eos = jnp.asarray(eos_token_ids).astype(tokens.dtype)
    return jnp.any(tokens[..., None] == eos, axis=-1)


def response_mask(tokens: jax.Array, eos_token_ids: Sequence[int], valid: jax.Array | None = None) -> jax.Array:
    """Mask of response tokens up to and including the first end token.

    tokens: (R, T) int; valid: optional (R, T) bool of positions that were
    generated at all (False beyond the length limit / an early loop exit).
    Returns (R, T) int32 in {0, 1}.
    """
    end = is_end_token(tokens, eos_token_ids)
    if valid is not None:
        end = end & valid
    # Number of end tokens strictly before each position: 0 → still inside.
    ends_before = jnp.cumsum(end.astype(jnp.int32), axis=-1) - end.astype(jnp.int32)
    mask = ends_before == 0
    if valid is not None:
        mask = mask & valid
    return mask.astype(jnp.int32)


def response_lengths(mask: jax.Array) -> jax.Array:
    """(R, T) response mask → (R,) int32 number of response tokens."""
    return jnp.sum(mask, axis=-1).astype(jnp.int32)


def pad_after_end(tokens: jax.Array, mask: jax.Array, pad_token_id: int | jax.Array) -> jax.Array:
    """Replace tokens outside the response mask by pad_token_id. (R, T) → (R, T)."""
    return jnp.where(mask.astype(bool), tokens, jnp.asarray(pad_token_id, tokens.dtype))


def finished(tokens: jax.Array, eos_token_ids: Sequence[int]) -> jax.Array:
    """(R, T) → (R,) bool: True where the response contains an end token (not truncated)."""
    return jnp.any(is_end_token(tokens, eos_token_ids), axis=-1)
