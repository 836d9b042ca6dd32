"""Properties of the VA-OPD objective (distill/objective.py) and the chunked KL (distill/kl.py), by hypothesis.

Each property holds for every input hypothesis draws, not for a few examples:
- values at masked-out positions (NaN, +-inf, 1e30, anything) never change a weight, a group, a coefficient,
  the loss or its gradient;
- finite inputs give finite outputs (weights in [0, 1] summing to 1 per prompt, coefficient rows summing to
  the weights, a finite loss);
- permuting the rollouts of a prompt permutes their weights and leaves the loss unchanged;
- a hyper-parameter outside its range (NaN, inf, negative, -0.0 where 0 is excluded, beyond 1, not a number)
  raises ValueError naming the field and the range; so do bad shapes and a K that does not divide the rows.
Example counts: tests/hypothesis_profiles.py (`cases`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hypothesis_profiles import cases
from vaopd_jax.distill import kl as kl_lib
from vaopd_jax.distill import objective

F32_MAX = float(np.finfo(np.float32).max)
KL_MAX = float(np.float32(1e30))
# What a masked-out position may hold: the values that broke sums before (NaN, inf) and any float32 at all.
POISON = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, F32_MAX, -F32_MAX, -0.0]),
                   st.floats(width=32))
# Any finite visual advantage (>= 0 as visual_advantage makes it), small ones drawn as often as huge ones.
FINITE_VA = st.one_of(st.floats(0, 1, width=32), st.floats(0, F32_MAX, width=32))


# One (R, T) shape, so that each jitted function below compiles once per K and method (seconds, not minutes):
# R = 12 rows hold 12 / K prompts for every K drawn; the masks give each rollout 0 to T valid tokens.
ROWS, LENGTH = 12, 6
KS = (1, 3, 4)  # K = 1 (a prompt of one rollout), 3 (not a power of two: sums round), 4 (the paper's)


@st.composite
def rollout_batches(draw, ks=KS):
    """(va (R, T) float32, mask (R, T) bool, K); masks need not be prefixes."""
    k = draw(st.sampled_from(ks))
    mask = draw(arrays(np.bool_, (ROWS, LENGTH)))
    va = draw(arrays(np.float32, (ROWS, LENGTH), elements=FINITE_VA))
    return va, mask, k


@functools.partial(jax.jit, static_argnames=("k",))
def _terms(va, mask, high_fraction, high_weight, tau, eps, *, k):
    """The terms of all four methods in one program (one compilation per K, not per K and method)."""
    return {method: objective.objective_terms(  # traced hyper-parameters: checked by the caller's ObjectiveConfig
        va, mask, k, objective.ObjectiveConfig(method, high_fraction, high_weight, tau, eps))
        for method in objective.METHODS}


def terms_of(va, mask, k, config):
    """objective_terms under jit (as the train step calls it), hyper-parameters as data."""
    return _terms(jnp.asarray(va), jnp.asarray(mask), config.high_fraction, config.high_weight, config.tau,
                  config.eps, k=k)[config.method]


@jax.jit
def _loss_and_grad(kl, terms):
    return jax.value_and_grad(objective.weighted_loss)(kl, terms)


_rollout_weights = jax.jit(objective.rollout_weights, static_argnums=2)
_va_opd_loss = jax.jit(objective.va_opd_loss, static_argnames=("num_rollouts", "reweight", "group"))
_opd_loss = jax.jit(objective.opd_loss)


def poison(values: np.ndarray, mask: np.ndarray, draw) -> np.ndarray:
    """``values`` with every masked-out position replaced by a drawn POISON value."""
    fill = draw(arrays(np.float32, values.shape, elements=POISON))
    return np.where(mask.astype(bool), values, fill).astype(np.float32)


def configs():
    return st.builds(objective.ObjectiveConfig, method=st.sampled_from(objective.METHODS),
                     high_fraction=st.floats(0, 1, exclude_min=True), high_weight=st.floats(0, 1),
                     tau=st.one_of(st.floats(1e-30, 1e30), st.just(1.0)),
                     eps=st.one_of(st.floats(1e-30, 1e30), st.just(1e-6)))


def assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def prompt_sums(weights, k):
    return np.asarray(weights, np.float64).reshape(-1, k).sum(-1)


# ----------------------------------------------------------------------------- masked-out positions
@cases(60)
@given(batch=rollout_batches(), config=configs(), data=st.data())
def test_masked_out_va_never_changes_the_terms(batch, config, data):
    va, mask, k = batch
    clean = terms_of(va, mask, k, config)
    dirty = terms_of(poison(va, mask, data.draw), mask, k, config)
    for name in ("coefficients", "rollout_weights", "high_mask", "num_prompts", "num_empty_rollouts"):
        assert_same(getattr(dirty, name), getattr(clean, name))
    assert np.isfinite(np.asarray(clean.coefficients)).all() and np.isfinite(np.asarray(clean.rollout_weights)).all()


@cases(20)
@given(batch=rollout_batches(ks=(4,)), data=st.data())
def test_masked_out_va_the_release_case_rollout_weights(batch, data):
    # The authors' release tests exactly this: NaN / inf stored at a masked-out VA position.
    va, mask, k = batch
    mask = mask.astype(data.draw(st.sampled_from([np.bool_, np.float32])))  # any non-zero entry is valid
    fill = data.draw(st.sampled_from([math.nan, math.inf]))
    dirty = np.where(mask.astype(bool), va, np.float32(fill))
    clean_w = _rollout_weights(jnp.asarray(va), jnp.asarray(mask), k)
    assert_same(_rollout_weights(jnp.asarray(dirty), jnp.asarray(mask), k), clean_w)
    assert np.isfinite(np.asarray(clean_w)).all()
    if mask.dtype == np.float32:  # and eagerly, as a user calls it (one mask dtype: eager ops compile per dtype)
        assert_same(objective.rollout_weights(jnp.asarray(dirty), jnp.asarray(mask), k), clean_w)


@cases(50)
@given(batch=rollout_batches(), config=configs(), data=st.data())
def test_masked_out_kl_never_changes_the_loss_or_its_gradient(batch, config, data):
    va, mask, k = batch
    kl = data.draw(arrays(np.float32, va.shape, elements=st.floats(0, KL_MAX, width=32)))
    terms = terms_of(va, mask, k, config)
    dirty = poison(kl, mask, data.draw)
    clean_loss, clean_grad = _loss_and_grad(jnp.asarray(kl), terms)
    dirty_loss, dirty_grad = _loss_and_grad(jnp.asarray(dirty), terms)
    assert_same(dirty_loss, clean_loss)
    assert_same(dirty_grad, clean_grad)
    assert np.isfinite(float(clean_loss))
    np.testing.assert_array_equal(np.asarray(clean_grad)[~mask.astype(bool)], 0.0)
    # The functional forms agree with the terms route (for the paper's K, so that they compile once per method).
    if k != 4:
        return
    if config.method == "opd":
        np.testing.assert_allclose(float(_opd_loss(jnp.asarray(dirty), jnp.asarray(mask))), float(clean_loss),
                                   rtol=1e-5)
    else:
        value = _va_opd_loss(jnp.asarray(dirty), jnp.asarray(poison(va, mask, data.draw)), jnp.asarray(mask),
                             num_rollouts=k, temperature=config.tau, eps=config.eps,
                             high_fraction=config.high_fraction, high_weight=config.high_weight,
                             reweight=config.reweight, group=config.group)
        np.testing.assert_allclose(float(value), float(clean_loss), rtol=1e-6)


@cases(40)
@given(logp=rollout_batches(), data=st.data())
def test_masked_out_log_probs_never_change_the_visual_advantage(logp, data):
    logp_orig, mask, _ = logp
    logp_orig = -logp_orig  # log-probs are <= 0
    logp_pix = -data.draw(arrays(np.float32, logp_orig.shape, elements=FINITE_VA))
    va = np.asarray(objective.visual_advantage(jnp.asarray(logp_orig), jnp.asarray(logp_pix), jnp.asarray(mask)))
    dirty = objective.visual_advantage(jnp.asarray(poison(logp_orig, mask, data.draw)),
                                       jnp.asarray(poison(logp_pix, mask, data.draw)), jnp.asarray(mask))
    assert_same(dirty, va)
    assert np.isfinite(va).all() and (va >= 0).all() and not np.signbit(va).any()
    assert (va[~mask.astype(bool)] == 0).all()


# ----------------------------------------------------------------------------- finite in, finite out
@cases(60)
@given(batch=rollout_batches(), config=configs(), data=st.data())
def test_finite_inputs_give_finite_normalised_weights_and_coefficients(batch, config, data):
    va, mask, k = batch
    terms = terms_of(va, mask, k, config)
    weights, coeff = np.asarray(terms.rollout_weights), np.asarray(terms.coefficients)
    assert np.isfinite(weights).all() and ((weights >= 0) & (weights <= 1)).all()
    assert np.isfinite(coeff).all() and (coeff >= 0).all()
    nonempty = mask.astype(bool).any(-1)
    assert (weights[~nonempty] == 0).all()
    if config.method != "opd":
        expected = nonempty.reshape(-1, k).any(-1).astype(np.float64)
        np.testing.assert_allclose(prompt_sums(weights, k), expected, rtol=1e-5, atol=1e-6)
        # Eq. 5: lambda + (1 - lambda) = 1, so each rollout's coefficients sum to its weight.
        np.testing.assert_allclose(coeff.astype(np.float64).sum(-1), weights, rtol=1e-5, atol=1e-6)
    assert int(terms.num_empty_rollouts) == int((~nonempty).sum())
    assert float(terms.num_prompts) == nonempty.reshape(-1, k).any(-1).sum()
    kl = data.draw(arrays(np.float32, va.shape, elements=st.floats(0, KL_MAX, width=32)))
    loss = float(_loss_and_grad(jnp.asarray(kl), terms)[0])
    assert np.isfinite(loss) and loss >= 0
    # The loss is a mean of per-rollout KL means: never above the largest valid KL.
    valid_kl = kl[mask.astype(bool)]
    assert loss <= (valid_kl.max() if valid_kl.size else 0.0) * (1 + 1e-5)


@cases(40)
@given(batch=rollout_batches(), data=st.data())
def test_equal_sibling_means_give_uniform_weights(batch, data):
    # docs/method.md: sigma = 0 -> z = 0 -> 1/K, for any common value and any K (not only when K is a power of two).
    _, mask, k = batch
    value = data.draw(FINITE_VA)
    va = np.where(mask.astype(bool), np.float32(value), np.float32(0))
    weights = np.asarray(terms_of(va, mask, k, objective.ObjectiveConfig()).rollout_weights).reshape(-1, k)
    nonempty = mask.astype(bool).any(-1).reshape(-1, k)
    expected = np.where(nonempty, 1.0 / np.maximum(nonempty.sum(-1, keepdims=True), 1), 0.0)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- permutations
@cases(60)
@given(batch=rollout_batches(), config=configs(), data=st.data())
def test_permuting_siblings_permutes_the_weights_and_keeps_the_loss(batch, config, data):
    va, mask, k = batch
    prompts = va.shape[0] // k
    # A permutation of the siblings inside each prompt, and of the prompts themselves.
    inner = [data.draw(st.permutations(range(k))) for _ in range(prompts)]
    outer = data.draw(st.permutations(range(prompts)))
    order = np.array([outer[p] * k + inner[p][i] for p in range(prompts) for i in range(k)])
    kl = data.draw(arrays(np.float32, va.shape, elements=st.floats(0, 1e3, width=32)))
    terms = terms_of(va, mask, k, config)
    moved = terms_of(va[order], mask[order], k, config)
    np.testing.assert_allclose(np.asarray(moved.rollout_weights), np.asarray(terms.rollout_weights)[order],
                               rtol=1e-5, atol=1e-7)
    assert_same(moved.high_mask, np.asarray(terms.high_mask)[order])
    np.testing.assert_allclose(float(_loss_and_grad(jnp.asarray(kl[order]), moved)[0]),
                               float(_loss_and_grad(jnp.asarray(kl), terms)[0]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- hyper-parameters out of range
def bad_values(field):
    """Values outside RANGES[field]: non-finite, non-numbers, and numbers beyond each closed/open end."""
    allowed = objective.RANGES[field]
    numbers = [st.sampled_from([math.nan, math.inf, -math.inf]), st.floats(max_value=-1e-30)]
    if allowed.lo == 0 and allowed.lo_open:
        numbers.append(st.sampled_from([0.0, -0.0]))
    if allowed.hi is not None:
        numbers.append(st.floats(min_value=allowed.hi, exclude_min=not allowed.hi_open, allow_infinity=False))
    others = st.sampled_from([True, False, "0.5", None, [0.5], complex(0.5, 0)])
    return st.one_of(*numbers, others)


@cases(30)
@given(data=st.data(), field=st.sampled_from(sorted(objective.RANGES)))
def test_out_of_range_hyperparameters_raise_naming_the_field_and_range(data, field):
    value = data.draw(bad_values(field))
    allowed = str(objective.RANGES[field])
    with pytest.raises(ValueError) as err:
        objective.ObjectiveConfig(**{field: value})
    assert f"ObjectiveConfig.{field}=" in str(err.value) and allowed in str(err.value)
    # The functions that take the same hyper-parameter directly check it the same way.
    va, mask = jnp.ones((2, 3)), jnp.ones((2, 3))
    calls = {
        "tau": (lambda v: objective.rollout_weights(va, mask, 2, temperature=v), "rollout_weights.temperature="),
        "eps": (lambda v: objective.rollout_weights(va, mask, 2, eps=v), "rollout_weights.eps="),
        "high_fraction": (lambda v: objective.high_group_mask(va, mask, v), "high_group_mask.high_fraction="),
        "high_weight": (lambda v: objective.token_coefficients(va, mask, jnp.ones(2), high_weight=v),
                        "token_coefficients.high_weight="),
    }
    call, name = calls[field]
    with pytest.raises(ValueError) as err:
        call(value)
    assert name in str(err.value) and allowed in str(err.value)


@cases(30)
@given(config=configs())
def test_in_range_hyperparameters_are_accepted(config):
    assert objective.ObjectiveConfig(**{f: getattr(config, f) for f in objective.RANGES}).tau == config.tau


def test_release_cases_nan_and_inf_tau_are_refused():
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match=r"ObjectiveConfig.tau=(nan|inf): must be a finite number in \(0, inf\)"):
            objective.ObjectiveConfig(tau=value)
    for field in ("high_fraction", "high_weight", "eps"):
        with pytest.raises(ValueError, match=f"ObjectiveConfig.{field}=nan: must be a finite number"):
            objective.ObjectiveConfig(**{field: math.nan})
    # -0.0 is not > 0 (tau, eps, p_v) but is a valid lambda (the same weight as 0.0).
    for field in ("tau", "eps", "high_fraction"):
        with pytest.raises(ValueError, match=f"ObjectiveConfig.{field}=-0.0"):
            objective.ObjectiveConfig(**{field: -0.0})
    assert objective.ObjectiveConfig(high_weight=-0.0).high_weight == 0.0


@cases(30)
@given(rows=st.integers(1, 12), k=st.integers(1, 12))
def test_k_not_dividing_the_rows_raises(rows, k):
    assume(rows % k)
    va = jnp.zeros((rows, 3))
    for call in (lambda: objective.rollout_weights(va, va, k), lambda: objective.uniform_weights(va, k),
                 lambda: objective.objective_terms(va, va, k)):
        with pytest.raises(ValueError, match=f"num_rollouts={k} must be >= 1 and divide the number of rows R={rows}"):
            call()
    with pytest.raises(ValueError, match="num_rollouts=2.0 must be an int"):
        objective.rollout_weights(jnp.zeros((4, 3)), jnp.ones((4, 3)), 2.0)


@cases(30)
@given(rows=st.integers(1, 4), length=st.integers(1, 5), other=st.tuples(st.integers(1, 4), st.integers(1, 5)))
def test_mismatched_shapes_raise_instead_of_broadcasting(rows, length, other):
    assume(other != (rows, length))
    mask, va = jnp.ones((rows, length)), jnp.ones(other)
    for call in (lambda: objective.rollout_weights(va, mask, 1), lambda: objective.high_group_mask(va, mask),
                 lambda: objective.visual_advantage(va, va, mask), lambda: objective.objective_terms(va, mask, 1)):
        with pytest.raises(ValueError, match="has shape"):
            call()
    terms = objective.ObjectiveTerms(jnp.zeros((rows, length)), jnp.zeros(rows), jnp.zeros((rows, length), bool),
                                     jnp.ones(()), jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="weighted_loss: kl has shape"):
        objective.weighted_loss(va, terms)


# ----------------------------------------------------------------------------- reverse KL, full and chunked
@st.composite
def logit_pairs(draw, bound=1e4):
    rows, vocab = 3, 9
    elements = st.floats(-bound, bound, width=32)
    return (draw(arrays(np.float32, (rows, vocab), elements=elements)),
            draw(arrays(np.float32, (rows, vocab), elements=elements)))


@cases(30)
@given(pair=logit_pairs(), data=st.data())
def test_reverse_kl_is_finite_non_negative_and_ignores_padded_vocab_rows(pair, data):
    student, teacher = pair
    vocab = student.shape[-1]
    valid = data.draw(st.integers(1, vocab))
    kl = np.asarray(objective.reverse_kl(jnp.asarray(student), jnp.asarray(teacher), valid_vocab_size=valid))
    assert np.isfinite(kl).all() and (kl >= -1e-4).all()
    assert (np.asarray(objective.reverse_kl(jnp.asarray(student), jnp.asarray(student))) == 0).all()
    pad = np.arange(vocab) >= valid
    dirty_s = np.where(pad, data.draw(arrays(np.float32, student.shape, elements=POISON)), student)
    dirty_t = np.where(pad, data.draw(arrays(np.float32, teacher.shape, elements=POISON)), teacher)
    fn = lambda s, t: objective.reverse_kl(s, t, valid_vocab_size=valid).sum()  # noqa: E731
    assert_same(objective.reverse_kl(jnp.asarray(dirty_s), jnp.asarray(dirty_t), valid_vocab_size=valid), kl)
    grad = np.asarray(jax.grad(fn)(jnp.asarray(dirty_s), jnp.asarray(dirty_t)))
    assert_same(grad, jax.grad(fn)(jnp.asarray(student), jnp.asarray(teacher)))
    assert (grad[:, pad] == 0).all()
    # Huge but finite logits still give a finite KL.
    huge = data.draw(logit_pairs(bound=KL_MAX))
    assert np.isfinite(np.asarray(objective.reverse_kl(jnp.asarray(huge[0]), jnp.asarray(huge[1])))).all()


def test_reverse_kl_refuses_bad_vocab_arguments():
    z = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="valid_vocab_size=0 must be an int >= 1"):
        objective.reverse_kl(z, z, valid_vocab_size=0)
    with pytest.raises(ValueError, match=r"teacher logits \(3, 5\) != student logits \(2, 5\)"):
        objective.reverse_kl(z, jnp.zeros((3, 5)))


CHUNK_SHAPES = [(2, 5)]  # (B, T): one static shape, compiled once per chunk size (5 = 5 x 1, 3 x 2 padded, 1 x 8)
HIDDEN, VOCAB, VALID = 4, 7, 6


@functools.partial(jax.jit, static_argnames=("chunk",))
def _chunked(hs, ws, ht, wt, targets, weight, *, chunk):
    """The chunked KL and log-probs, the pixelated-view log-probs, and the gradient of sum(weight * KL)."""
    run = functools.partial(kl_lib.token_kl_and_logprobs, valid_vocab_size=VALID, chunk_size=chunk)
    outputs = run(hs, ws, ht, wt, targets)
    logp = kl_lib.token_logprobs(ht, wt, targets, valid_vocab_size=VALID, chunk_size=chunk)
    grads = jax.grad(lambda a, b: (weight * run(a, b, ht, wt, targets)[0]).sum(), argnums=(0, 1))(hs, ws)
    return outputs, logp, grads


@cases(25)
@given(shape=st.sampled_from(CHUNK_SHAPES), chunk=st.sampled_from([1, 2, 8]), data=st.data())
def test_chunked_kl_matches_the_full_kl_and_positions_are_independent(shape, chunk, data):
    batch, length = shape
    small = st.floats(-3, 3, width=32)
    hs, ht = (data.draw(arrays(np.float32, (batch, length, HIDDEN), elements=small)) for _ in range(2))
    ws, wt = (data.draw(arrays(np.float32, (HIDDEN, VOCAB), elements=small)) for _ in range(2))
    targets = data.draw(arrays(np.int32, (batch, length), elements=st.integers(0, VALID - 1)))
    # Poison the hidden states of some positions: the other positions' outputs, and the gradient through a
    # loss that gives the poisoned positions weight 0 (a response mask), do not change.
    poisoned = data.draw(arrays(np.bool_, (batch, length)))
    weight = np.where(poisoned, 0.0, 1.0).astype(np.float32)
    (kl, logp_t, logp_s), logp_pix, grads = jax.tree.map(np.asarray, _chunked(hs, ws, ht, wt, targets, weight,
                                                                               chunk=chunk))
    full = objective.reverse_kl(jnp.einsum("bth,hv->btv", hs, ws), jnp.einsum("bth,hv->btv", ht, wt),
                                valid_vocab_size=VALID)
    np.testing.assert_allclose(kl, np.asarray(full), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logp_pix, logp_t, rtol=1e-5, atol=1e-5)
    assert np.isfinite(kl).all() and (logp_t <= 1e-6).all() and (logp_s <= 1e-6).all()
    dirty_hs = np.where(poisoned[..., None], data.draw(arrays(np.float32, hs.shape, elements=POISON)), hs)
    dirty_ht = np.where(poisoned[..., None], data.draw(arrays(np.float32, ht.shape, elements=POISON)), ht)
    dirty, dirty_logp_pix, dirty_grads = jax.tree.map(np.asarray, _chunked(dirty_hs, ws, dirty_ht, wt, targets,
                                                                           weight, chunk=chunk))
    for got, want in zip(dirty + (dirty_logp_pix,), (kl, logp_t, logp_s, logp_pix)):
        assert_same(got[~poisoned], want[~poisoned])
    for got, want in zip(dirty_grads, grads):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@cases(20)
@given(target=st.one_of(st.integers(-10, -1), st.integers(6, 40)))
def test_chunked_kl_refuses_targets_outside_the_valid_vocabulary(target):
    hidden, kernel = jnp.zeros((1, 2, 4)), jnp.zeros((4, 7))
    targets = jnp.asarray([[0, target]], jnp.int32)
    with pytest.raises(ValueError, match=r"targets hold token ids in .* allowed \[0, 6\)"):
        kl_lib.token_kl_and_logprobs(hidden, kernel, hidden, kernel, targets, valid_vocab_size=6)
    with pytest.raises(ValueError, match=r"allowed \[0, 6\)"):
        kl_lib.token_logprobs(hidden, kernel, targets, valid_vocab_size=6)
    with pytest.raises(ValueError, match="chunk_size=0"):
        kl_lib.token_logprobs(hidden, kernel, jnp.zeros((1, 2), jnp.int32), chunk_size=0)
