"""Properties of the rollout sampler's filters (rollout/logits.py), masks (rollout/masks.py) and stop rule
(rollout/sampler.py), by hypothesis.

- a drawn token always lies in the support the settings define: the valid vocabulary, the top-k set and the
  nucleus (the smallest most-likely set holding top_p of the mass), and greedy is the argmax;
- whatever the padded vocabulary rows hold (NaN, inf), the tokens and log-probs do not change;
- the response mask is 1 up to and including the first end token and 0 after, whatever comes after;
- a real sampler run stops at the first end token of each row, pads after it and never exceeds
  max_new_tokens;
- settings outside their range (NaN, inf, booleans, negatives, non-integers) raise ValueError naming them.
Example counts: tests/hypothesis_profiles.py (`cases`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hypothesis_profiles import cases
from vaopd_jax.rollout import logits as lp
from vaopd_jax.rollout import masks

ROWS, VOCAB = 4, 12
POISON = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30]), st.floats(width=32))
# A few static settings (each compiles once): greedy, the nucleus inside the candidates and past them (the
# threshold-search fallback), top-k then top-p, hot and cold temperatures.
SETTINGS = [lp.SamplingParams(0.0), lp.SamplingParams(0.7, top_p=0.9, top_p_candidates=3),
            lp.SamplingParams(1.3, top_p=0.5, top_p_candidates=256),
            lp.SamplingParams(2.0, top_k=5, top_p=0.8, top_p_candidates=2)]


@functools.partial(jax.jit, static_argnames=("params",))
def _sample(key, logits, valid, *, params):
    tokens, logprobs, model_logprobs = lp.sample_tokens(key, logits, params, valid)
    support = jnp.isfinite(lp.sampling_logits(logits, params, valid)) if not params.greedy else None
    return tokens, logprobs, model_logprobs, support


@st.composite
def logit_rows(draw):
    # No subnormals: XLA on CPU flushes them to 0, so -1e-45 ties with 0 for the argmax (numpy tells them apart).
    logits = draw(arrays(np.float32, (ROWS, VOCAB), elements=st.floats(-30, 30, width=32, allow_subnormal=False)))
    return logits, draw(st.integers(1, VOCAB)), draw(st.sampled_from(SETTINGS)), draw(st.integers(0, 2 ** 31 - 1))


def nucleus_ok(probs: np.ndarray, keep: np.ndarray, top_p: float) -> bool:
    """HF's nucleus: the kept set reaches top_p, and the mass of tokens strictly more likely than its least
    likely member is below top_p (so no smaller most-likely set would do). float64, rounding slack 1e-5."""
    kept = probs[keep]
    return kept.sum() >= top_p - 1e-5 and probs[probs > kept.min()].sum() < top_p + 1e-5


@cases(60)
@given(rows=logit_rows())
def test_drawn_tokens_lie_in_the_support_the_settings_define(rows):
    logits, valid, params, seed = rows
    tokens, logprobs, model_logprobs, support = jax.tree.map(
        np.asarray, _sample(jax.random.key(seed), jnp.asarray(logits), np.int32(valid), params=params))
    assert ((tokens >= 0) & (tokens < valid)).all()
    assert np.isfinite(logprobs).all() and (logprobs <= 1e-6).all()
    assert np.isfinite(model_logprobs).all() and (model_logprobs <= 1e-6).all()
    live = logits[:, :valid].astype(np.float64)
    if params.greedy:
        np.testing.assert_array_equal(tokens, live.argmax(-1))
        assert (logprobs == 0).all()
        return
    assert support[np.arange(ROWS), tokens].all() and not support[:, valid:].any()
    scaled = live / params.temperature
    for row in range(ROWS):
        keep = support[row, :valid]
        assert keep[scaled[row].argmax()]  # the most likely token is always kept
        if params.top_k:
            kth = np.sort(scaled[row])[::-1][min(params.top_k, valid) - 1]
            assert (scaled[row][keep] >= kth).all()
            after_k = scaled[row] >= kth
        else:
            after_k = np.ones(valid, bool)
        if params.top_p < 1:
            probs = np.where(after_k, np.exp(scaled[row] - scaled[row][after_k].max()), 0.0)
            assert nucleus_ok(probs / probs.sum(), keep, params.top_p)
        else:
            np.testing.assert_array_equal(keep, after_k)


@cases(40)
@given(rows=logit_rows(), data=st.data())
def test_padded_vocab_rows_never_change_the_draw(rows, data):
    logits, valid, params, seed = rows
    dirty = np.where(np.arange(VOCAB) >= valid, data.draw(arrays(np.float32, logits.shape, elements=POISON)), logits)
    key = jax.random.key(seed)
    clean = _sample(key, jnp.asarray(logits), np.int32(valid), params=params)[:3]
    for got, want in zip(_sample(key, jnp.asarray(dirty), np.int32(valid), params=params)[:3], clean):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@cases(40)
@given(temperature=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, True, "0.7", None]),
                             st.floats(max_value=-1e-30)))
def test_bad_temperature_raises_naming_it(temperature):
    with pytest.raises(ValueError, match=r"SamplingParams.temperature=.*must be a finite number in \[0, inf\)"):
        lp.SamplingParams(temperature=temperature)


@cases(40)
@given(top_p=st.one_of(st.sampled_from([math.nan, math.inf, 0.0, -0.0, True, "0.9"]), st.floats(max_value=0.0),
                       st.floats(min_value=1.0, exclude_min=True)))
def test_bad_top_p_raises_naming_it(top_p):
    with pytest.raises(ValueError, match=r"SamplingParams.top_p=.*must be a number in \(0, 1\]"):
        lp.SamplingParams(top_p=top_p)


@cases(30)
@given(top_k=st.one_of(st.integers(max_value=-1), st.sampled_from([True, 2.5, math.nan, "3", None])))
def test_bad_top_k_raises_naming_it(top_k):
    with pytest.raises(ValueError, match=r"SamplingParams.top_k=.*must be an int in \[0, inf\)"):
        lp.SamplingParams(top_k=top_k)


# ----------------------------------------------------------------------------- response masks
def reference_mask(tokens: np.ndarray, eos: set, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(tokens.shape, np.int32)
    for r, row in enumerate(tokens):
        for t, token in enumerate(row):
            if not valid[r, t]:
                break
            out[r, t] = 1
            if int(token) in eos:
                break
    return out


@cases(60)
@given(tokens=arrays(np.int32, (5, 9), elements=st.integers(0, 6)), eos=st.sets(st.integers(0, 6), max_size=3),
       lengths=arrays(np.int32, (5,), elements=st.integers(0, 9)), data=st.data())
def test_response_mask_ends_at_the_first_end_token_whatever_follows(tokens, eos, lengths, data):
    valid = np.arange(9)[None] < lengths[:, None]  # generated at all (the length limit / an early exit)
    eos_ids = sorted(eos)
    mask = np.asarray(masks.response_mask(jnp.asarray(tokens), eos_ids, jnp.asarray(valid)))
    np.testing.assert_array_equal(mask, reference_mask(tokens, eos, valid))
    np.testing.assert_array_equal(np.asarray(masks.response_lengths(jnp.asarray(mask))), mask.sum(-1))
    # Whatever sits after the end (or past the length limit) does not change the mask.
    noise = data.draw(arrays(np.int32, tokens.shape, elements=st.integers(0, 6)))
    dirty = np.where(mask.astype(bool), tokens, noise)
    np.testing.assert_array_equal(np.asarray(masks.response_mask(jnp.asarray(dirty), eos_ids, jnp.asarray(valid))),
                                  mask)
    np.testing.assert_array_equal(np.asarray(masks.pad_after_end(jnp.asarray(tokens), jnp.asarray(mask), 99)),
                                  np.where(mask.astype(bool), tokens, 99))
    finished = np.asarray(masks.finished(jnp.asarray(np.where(mask.astype(bool), tokens, -1)), eos_ids))
    np.testing.assert_array_equal(finished, [bool(set(row[m > 0].tolist()) & eos) for row, m in zip(tokens, mask)])


# ----------------------------------------------------------------------------- the real sampler's stop rule
@pytest.fixture(scope="module")
def tiny_model():
    from flax import nnx

    from vaopd_jax import config as config_lib
    from vaopd_jax.models import qwen3_vl

    spec = config_lib.tiny_spec(hidden=16, layers=1, heads=2, kv_heads=1, mlp=32, vision_depth=1,
                                vision_hidden=32, head_dim=8, vocab_size=24)
    for i, name in enumerate(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")):
        spec[name] = 20 + i  # inside the 24-token vocabulary; never generated (suppressed by default)
    cfg = config_lib.model_config_from_spec(spec)
    return qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


@cases(8)
@given(eos=st.sets(st.integers(0, 19), min_size=1, max_size=6), max_new_tokens=st.integers(1, 16),
       seed=st.integers(0, 1000))
def test_sampler_stops_at_the_first_end_token_and_never_exceeds_the_limit(tiny_model, eos, max_new_tokens, seed):
    from vaopd_jax.rollout import sampler

    prompts = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], np.int32)
    out = jax.tree.map(np.asarray, sampler.generate(
        tiny_model, prompts, (prompts > 0).astype(np.int32), max_new_tokens=max_new_tokens, num_samples=2,
        eos_token_ids=tuple(sorted(eos)), pad_token_id=0, rng=seed, min_new_bucket=16))
    generated = np.arange(out.tokens.shape[1])[None] < max_new_tokens
    np.testing.assert_array_equal(out.response_mask, reference_mask(out.tokens, eos, np.broadcast_to(
        generated, out.tokens.shape)))
    assert (out.lengths <= max_new_tokens).all() and (out.lengths >= 1).all()
    np.testing.assert_array_equal(out.lengths, out.response_mask.sum(-1))
    assert (out.tokens[out.response_mask == 0] == 0).all()  # padded after the end
    ends = np.isin(out.tokens, list(eos)) & (out.response_mask > 0)
    np.testing.assert_array_equal(out.finished, ends.any(-1))
    assert (ends.sum(-1) <= 1).all()  # at most one end token inside a response: the last one
    assert (out.logprobs[out.response_mask == 0] == 0).all() and np.isfinite(out.logprobs).all()


def test_sampler_refuses_bad_settings_naming_them(tiny_model):
    from vaopd_jax.rollout import sampler

    bad = [(dict(max_new_tokens=True), "max_new_tokens must be an int >= 1"),
           (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 1"),
           (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
           (dict(max_new_tokens=4, num_samples=True), "num_samples must be an int >= 1"),
           (dict(max_new_tokens=4, temperature=math.inf), "SamplingParams.temperature=inf"),
           (dict(max_new_tokens=4, temperature="0.7"), "SamplingParams.temperature='0.7'"),
           (dict(max_new_tokens=4, top_k=2.5), "SamplingParams.top_k=2.5"),
           (dict(max_new_tokens=4, top_p=math.nan), "SamplingParams.top_p=nan"),
           (dict(max_new_tokens=4, eos_token_ids=(24,)), r"eos_token_ids entry 24 is outside the model vocabulary"),
           (dict(max_new_tokens=4, valid_vocab_size=0), r"valid_vocab_size must be in \[1, 24\]")]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            sampler.Sampler(tiny_model, **{"eos_token_ids": (1,), **settings})
