"""Logit processing, sampling statistics and response masks of the rollout sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaopd_jax.rollout import logits as lp
from vaopd_jax.rollout import masks
from references import require


def _hf_processed(scores: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' own warper chain (temperature → top-k → top-p) as the reference."""
    torch = require("torch")
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = torch.tensor(scores, dtype=torch.float32)
    out = TemperatureLogitsWarper(temperature)(None, out)
    if top_k > 0:
        out = TopKLogitsWarper(top_k)(None, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(None, out)
    return out.numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,candidates",
    [
        (0.7, 0, 0.95, 4),  # nucleus wider than the candidates → full-sort fallback
        (0.7, 0, 0.95, 512),  # candidates cover the whole vocab
        (1.3, 0, 0.5, 16),
        (1.0, 5, 1.0, 256),
        (0.5, 20, 0.8, 256),
        (1.0, 0, 0.3, 8),  # peaked rows: the nucleus closes inside the candidates
    ],
)
def test_processing_matches_transformers_warpers(temperature, top_k, top_p, candidates):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 200)).astype(np.float32) * 3.0
    scores[3, 17] = 40.0  # one very peaked row
    params = lp.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, top_p_candidates=candidates)
    ours = np.asarray(jax.jit(lp.sampling_logits, static_argnums=(1, 2))(jnp.asarray(scores), params, None))
    ref = _hf_processed(scores, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)
    assert np.isfinite(ours).sum(axis=-1).min() >= 1


def test_top_p_keeps_smallest_set_reaching_top_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    scaled = jnp.log(jnp.asarray(probs))
    # 0.5 + 0.3 = 0.8 ≥ 0.8 → exactly two tokens; 0.81 needs a third.
    top_p_mask = jax.jit(lp.top_p_mask, static_argnums=(1, 2))
    np.testing.assert_array_equal(np.asarray(top_p_mask(scaled, 0.8, 2)), [[True, True, False, False]])
    np.testing.assert_array_equal(np.asarray(top_p_mask(scaled, 0.81, 2)), [[True, True, True, False]])
    # The top token is always kept, even for a tiny top_p.
    np.testing.assert_array_equal(np.asarray(top_p_mask(scaled, 1e-9, 4)), [[True, False, False, False]])


def test_top_k_keeps_ties_like_transformers():
    scaled = jnp.asarray([[3.0, 1.0, 2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(lp.top_k_mask(scaled, 2)), [[True, False, True, True, False]])


def test_sampling_params_validation_names_field():
    with pytest.raises(ValueError, match="top_p"):
        lp.SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        lp.SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        lp.SamplingParams(top_k=-1)


def test_greedy_ignores_padded_vocab_rows_and_reports_model_logprob():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 9.0], [5.0, 1.0, 2.0, 0.0]])
    params = lp.SamplingParams(temperature=0.0)
    tokens, logprobs, model_logprobs = jax.jit(lambda k, x: lp.sample_tokens(k, x, params, 3))(jax.random.key(0), logits)
    np.testing.assert_array_equal(np.asarray(tokens), [2, 0])
    np.testing.assert_array_equal(np.asarray(logprobs), [0.0, 0.0])
    ref = jax.nn.log_softmax(logits[:, :3], axis=-1)
    np.testing.assert_allclose(np.asarray(model_logprobs), [ref[0, 2], ref[1, 0]], atol=1e-6)


_sample_jit = jax.jit(lp.sample_tokens, static_argnums=(2, 3))


def _draw(logits_row, params, valid_vocab_size=None, n=40000, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
    return [np.asarray(a) for a in _sample_jit(jax.random.key(seed), logits, params, valid_vocab_size)]


def _total_variation(samples, probs):
    freq = np.bincount(samples, minlength=len(probs)) / len(samples)
    return 0.5 * np.abs(freq - probs).sum()


def test_temperature_one_frequencies_match_softmax():
    row = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7], np.float32)
    tokens, logprobs, model_logprobs = _draw(row, lp.SamplingParams(temperature=1.0))
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    # 40k draws over 8 outcomes: the expected TV distance is ~0.006; 0.02 is > 5 sigma.
    assert _total_variation(tokens, probs) < 0.02
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), rtol=1e-5)
    np.testing.assert_allclose(model_logprobs, logprobs, rtol=1e-5)


def test_temperature_scales_the_distribution():
    row = np.array([1.0, 0.0, -1.0, 0.5], np.float32)
    tokens, logprobs, model_logprobs = _draw(row, lp.SamplingParams(temperature=0.5))
    probs = np.exp(row / 0.5) / np.exp(row / 0.5).sum()
    assert _total_variation(tokens, probs) < 0.02
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), rtol=1e-5)
    raw = np.exp(row) / np.exp(row).sum()
    np.testing.assert_allclose(model_logprobs, np.log(raw[tokens]), rtol=1e-5)


def test_top_p_and_top_k_never_emit_excluded_tokens_and_renormalize():
    probs = np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], np.float32)
    row = np.log(probs)
    tokens, logprobs, _ = _draw(row, lp.SamplingParams(temperature=1.0, top_p=0.75, top_p_candidates=2))
    assert set(np.unique(tokens)) == {0, 1, 2}  # 0.35 + 0.25 < 0.75 ≤ + 0.2
    kept = probs[:3] / probs[:3].sum()
    assert _total_variation(tokens, np.r_[kept, 0, 0, 0]) < 0.02
    np.testing.assert_allclose(logprobs, np.log(kept[tokens]), rtol=1e-5)

    tokens, _, _ = _draw(row, lp.SamplingParams(temperature=1.0, top_k=2))
    assert set(np.unique(tokens)) == {0, 1}


def test_padded_vocab_rows_never_sampled():
    row = np.array([0.0, 0.0, 0.0, 50.0, 50.0], np.float32)  # padding rows hold the mass
    tokens, logprobs, model_logprobs = _draw(row, lp.SamplingParams(temperature=1.0), valid_vocab_size=3, n=5000)
    assert tokens.max() <= 2 and set(np.unique(tokens)) == {0, 1, 2}
    np.testing.assert_allclose(model_logprobs, np.log(1 / 3), rtol=1e-5)


def test_fixed_key_reproducible_and_keys_differ():
    row = np.zeros(50, np.float32)
    a = _draw(row, lp.SamplingParams(temperature=1.0, top_p=0.9), n=64, seed=3)[0]
    b = _draw(row, lp.SamplingParams(temperature=1.0, top_p=0.9), n=64, seed=3)[0]
    c = _draw(row, lp.SamplingParams(temperature=1.0, top_p=0.9), n=64, seed=4)[0]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_response_mask_includes_first_end_token_only():
    eos = (7, 9)
    tokens = jnp.asarray(
        [
            [1, 2, 7, 3, 9],  # ends at index 2; tokens after are excluded
            [1, 2, 3, 4, 5],  # truncated: keeps all tokens
            [9, 1, 1, 1, 1],  # end token first: length 1
            [1, 9, 7, 7, 1],  # later end tokens do not matter
        ]
    )
    mask = masks.response_mask(tokens, eos)
    np.testing.assert_array_equal(
        np.asarray(mask),
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],
    )
    np.testing.assert_array_equal(np.asarray(masks.response_lengths(mask)), [3, 5, 1, 2])
    np.testing.assert_array_equal(np.asarray(masks.finished(tokens, eos)), [True, False, True, True])
    padded = masks.pad_after_end(tokens, mask, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(padded[0]), [1, 2, 7, 0, 0])
    # Positions never generated (early loop exit) are outside the mask.
    valid = jnp.arange(5)[None, :] < jnp.asarray([[5], [3], [5], [5]])
    np.testing.assert_array_equal(np.asarray(masks.response_mask(tokens, eos, valid)[1]), [1, 1, 1, 0, 0])


def test_inverse_cdf_across_blocks_matches_weights_and_skips_zero_weights():
    # 12 supported tokens spread over 3 blocks of 128 (V = 300, not a multiple of the block).
    support = np.array([0, 5, 127, 128, 129, 200, 255, 256, 260, 280, 298, 299])
    row = np.full(300, -np.inf, np.float32)
    row[support] = np.linspace(-1.0, 1.5, len(support))
    tokens, logprobs, _ = _draw(row, lp.SamplingParams(temperature=1.0), n=40000, seed=9)
    probs = np.zeros(300)
    probs[support] = np.exp(row[support]) / np.exp(row[support]).sum()
    assert set(np.unique(tokens)) == set(support)
    assert _total_variation(tokens, probs) < 0.02
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), rtol=1e-5)


def test_given_uniforms_replace_the_keys_draw_row_by_row():
    """sample_tokens(uniform=u) with u = uniform(key, (B,)) draws what sample_tokens(key) draws, and a subset of
    rows given its share of u draws those rows' tokens (the decode loop's compacted stages rely on it)."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((12, 40)).astype(np.float32) * 3)
    params = lp.SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    key = jax.random.key(7)
    by_key = lp.sample_tokens(key, logits, params, 37)
    u = jax.random.uniform(key, (12,), jnp.float32)
    by_uniform = lp.sample_tokens(None, logits, params, 37, uniform=u)
    for a, b in zip(by_key, by_uniform):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = np.array([9, 2, 2, 11])
    subset = lp.sample_tokens(None, logits[rows], params, 37, uniform=u[rows])
    for a, b in zip(by_key, subset):
        np.testing.assert_array_equal(np.asarray(a)[rows], np.asarray(b))
    # The draws follow u: u near 0 picks the first kept token, near 1 the last one (tokens differ across u).
    low = lp.sample_tokens(None, logits, params, 37, uniform=jnp.zeros(12))[0]
    high = lp.sample_tokens(None, logits, params, 37, uniform=jnp.full(12, 0.999999))[0]
    assert (np.asarray(low) != np.asarray(high)).any()
