"""The VA-OPD objective against docs/method.md's reference numbers and definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.oracles import reference_opd_loss
from vaopd_jax.distill import objective


def _va_with_means(means, length=10):
    """One prompt, rows of constant VA equal to the given rollout means, all tokens valid."""
    means = np.asarray(means, np.float32)
    va = np.repeat(means[:, None], length, axis=1)
    return jnp.asarray(va), jnp.ones(va.shape, jnp.float32)


def test_visual_advantage_clips_negative_and_masks():
    logp_orig = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
    logp_pix = jnp.array([[-1.5, -1.0, -0.5, -0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    va = objective.visual_advantage(logp_orig, logp_pix, mask)
    np.testing.assert_allclose(np.asarray(va), [[0.5, 0.0, 0.0, 0.0]])
    assert not np.signbit(np.asarray(va)).any()


def test_visual_advantage_is_stop_gradient():
    grad = jax.grad(lambda x: objective.visual_advantage(x, jnp.zeros(3), jnp.ones(3)).sum())(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_rollout_weights_reference_numbers():
    va, mask = _va_with_means([0.045, 0.030, 0.020, 0.010])
    w = objective.rollout_weights(va, mask, num_rollouts=4)
    np.testing.assert_allclose(np.asarray(w), [0.656, 0.206, 0.095, 0.044], atol=1e-3)
    assert abs(float(w.sum()) - 1.0) < 1e-6


def test_rollout_weights_use_masked_means_and_population_std():
    # Means over valid tokens only: padding with large VA must not move the weights.
    va, mask = _va_with_means([0.045, 0.030, 0.020, 0.010], length=6)
    va = va.at[:, 4:].set(7.0)
    mask = mask.at[:, 4:].set(0.0)
    w = objective.rollout_weights(va, mask, num_rollouts=4)
    np.testing.assert_allclose(np.asarray(w), [0.656, 0.206, 0.095, 0.044], atol=1e-3)
    # Temperature sharpens: tau = 0.5 doubles z.
    va2, mask2 = _va_with_means([0.045, 0.030, 0.020, 0.010])
    means = np.array([0.045, 0.030, 0.020, 0.010])
    z = (means - means.mean()) / (means.std(ddof=0) + 1e-6)
    expected = np.exp(2 * z) / np.exp(2 * z).sum()
    np.testing.assert_allclose(np.asarray(objective.rollout_weights(va2, mask2, 4, temperature=0.5)), expected,
                               rtol=1e-5)


def test_equal_va_gives_uniform_weights_per_prompt():
    va = jnp.concatenate([_va_with_means([0.3] * 4)[0], _va_with_means([0.0] * 4)[0]])
    w = objective.rollout_weights(va, jnp.ones(va.shape), num_rollouts=4)
    np.testing.assert_allclose(np.asarray(w), 0.25, rtol=1e-6)
    # eps = 0 would make these 0 / 0 = NaN weights: refused, in the function and in the config
    with pytest.raises(ValueError, match=r"rollout_weights.eps=0.0: must be in \(0, inf\)"):
        objective.rollout_weights(va, jnp.ones(va.shape), num_rollouts=4, eps=0.0)
    with pytest.raises(ValueError, match=r"ObjectiveConfig.eps=0.0: must be in \(0, inf\)"):
        objective.ObjectiveConfig(eps=0.0)


def test_weights_are_per_prompt_groups_of_adjacent_siblings():
    va = jnp.concatenate([_va_with_means([0.045, 0.030, 0.020, 0.010])[0],
                          _va_with_means([0.010, 0.020, 0.030, 0.045])[0]])
    w = np.asarray(objective.rollout_weights(va, jnp.ones(va.shape), num_rollouts=4))
    np.testing.assert_allclose(w[:4], [0.656, 0.206, 0.095, 0.044], atol=1e-3)
    np.testing.assert_allclose(w[4:], [0.044, 0.095, 0.206, 0.656], atol=1e-3)


def test_empty_rollout_gets_zero_weight_and_siblings_renormalize():
    va, mask = _va_with_means([0.045, 0.030, 0.020, 0.010])
    mask = mask.at[3].set(0.0)
    w = np.asarray(objective.rollout_weights(va, mask, num_rollouts=4))
    means = np.array([0.045, 0.030, 0.020])
    z = (means - means.mean()) / (means.std() + 1e-6)
    np.testing.assert_allclose(w[:3], np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    assert w[3] == 0.0
    # A prompt with only empty rollouts: all weights 0, finite.
    w_all = objective.rollout_weights(va, jnp.zeros(va.shape), num_rollouts=4)
    np.testing.assert_array_equal(np.asarray(w_all), 0.0)


def test_bad_num_rollouts_is_a_clear_error():
    va, mask = _va_with_means([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="num_rollouts=2"):
        objective.rollout_weights(va, mask, num_rollouts=2)


def test_token_coefficients_reference_numbers():
    # T = 10, p_v = 0.2 -> n_high = 2; lambda = 0.5 -> 0.5/2 = 0.25 and 0.5/8 = 0.0625.
    va = jnp.array([[0.1, 0.9, 0.0, 0.3, 0.8, 0.2, 0.0, 0.05, 0.4, 0.6]])
    mask = jnp.ones_like(va)
    c = np.asarray(objective.token_coefficients(va, mask, jnp.ones(1), high_fraction=0.2, high_weight=0.5))
    expected = np.full(10, 0.0625)
    expected[[1, 4]] = 0.25
    np.testing.assert_allclose(c[0], expected, rtol=1e-6)
    # times w^(k)
    c_w = np.asarray(objective.token_coefficients(va, mask, jnp.array([0.4])))
    np.testing.assert_allclose(c_w[0], 0.4 * expected, rtol=1e-6)


def test_single_token_rollout_puts_all_mass_in_high_group():
    va = jnp.array([[0.3, 0.0, 0.0]])
    mask = jnp.array([[1.0, 0.0, 0.0]])
    c = np.asarray(objective.token_coefficients(va, mask, jnp.ones(1)))
    np.testing.assert_allclose(c, [[1.0, 0.0, 0.0]])


def test_ties_go_to_the_earlier_token_and_padding_never_ranks():
    # All-equal VA (e.g. all zero): the first ceil(0.2 * 7) = 2 valid tokens are "high".
    va = jnp.zeros((1, 9))
    mask = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    high = np.asarray(objective.high_group_mask(va, mask, 0.2))
    np.testing.assert_array_equal(high[0], [1, 1, 0, 0, 0, 0, 0, 0, 0])
    # A tie at the boundary: tokens 2 and 5 share the second-largest value; 2 wins.
    va = jnp.array([[0.1, 0.0, 0.5, 0.9, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    high = np.asarray(objective.high_group_mask(va, jnp.ones_like(va), 0.2))
    np.testing.assert_array_equal(np.nonzero(high[0])[0], [2, 3])
    # Padding with huge VA is never ranked.
    va = jnp.array([[0.1, 0.2, 0.0, 9.0, 9.0]])
    high = np.asarray(objective.high_group_mask(va, jnp.array([[1, 1, 1, 0, 0]]), 0.2))
    np.testing.assert_array_equal(high[0], [0, 1, 0, 0, 0])


def test_num_high_tokens_ceil_without_float_overshoot():
    counts = jnp.array([0.0, 1.0, 4.0, 5.0, 6.0, 10.0, 30.0, 31.0])
    np.testing.assert_array_equal(np.asarray(objective.num_high_tokens(counts, 0.2)), [0, 1, 1, 1, 2, 2, 6, 7])
    np.testing.assert_array_equal(np.asarray(objective.num_high_tokens(jnp.array([30.0]), 0.1)), [3])


def test_masks_first_end_token_included_and_truncated_kept():
    # Row 0 ended at its 3rd token (end token included in the mask), row 1 was truncated (all valid).
    kl = jnp.array([[1.0, 2.0, 3.0, 100.0], [1.0, 1.0, 1.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss = objective.opd_loss(kl, mask)
    np.testing.assert_allclose(float(loss), ((1 + 2 + 3) / 3 + 8 / 4) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(reference_opd_loss(kl, mask)), float(loss), rtol=1e-6)


def test_va_opd_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    num_prompts, k, length = 3, 4, 12
    va = rng.exponential(0.05, (num_prompts * k, length)).astype(np.float32)
    kl = rng.uniform(0, 2, va.shape).astype(np.float32)
    lengths = rng.integers(1, length + 1, num_prompts * k)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    loss = float(objective.va_opd_loss(jnp.asarray(kl), jnp.asarray(va), jnp.asarray(mask), num_rollouts=k,
                                       high_fraction=0.25, high_weight=0.7))
    expected = 0.0
    for p in range(num_prompts):
        rows = range(p * k, (p + 1) * k)
        means = np.array([va[r, :lengths[r]].mean() for r in rows])
        z = (means - means.mean()) / (means.std() + 1e-6)
        w = np.exp(z) / np.exp(z).sum()
        for w_k, r in zip(w, rows):
            n = lengths[r]
            order = sorted(range(n), key=lambda t: (-va[r, t], t))
            n_high = max(1, int(np.ceil(0.25 * n - 1e-9)))
            high, low = order[:n_high], order[n_high:]
            group = (0.7 * kl[r, high].mean() + 0.3 * kl[r, low].mean()) if low else kl[r, high].mean()
            expected += w_k * group
    np.testing.assert_allclose(loss, expected / num_prompts, rtol=1e-5)


def test_ablations_reduce_to_definitions():
    rng = np.random.default_rng(1)
    k, length = 4, 10
    va = jnp.asarray(rng.exponential(0.05, (2 * k, length)), jnp.float32)
    kl = jnp.asarray(rng.uniform(0, 2, (2 * k, length)), jnp.float32)
    lengths = rng.integers(2, length + 1, 2 * k)
    mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.float32)
    opd = float(reference_opd_loss(kl, mask))
    np.testing.assert_allclose(float(objective.opd_loss(kl, mask)), opd, rtol=1e-6)
    neither = float(objective.va_opd_loss(kl, va, mask, k, reweight=False, group=False))
    np.testing.assert_allclose(neither, opd, rtol=1e-6)
    # Equal VA: reweighting is uniform, so VA-OPD == grouping only, and reweight-only == OPD.
    equal_va = jnp.full_like(va, 0.25) * mask  # exact means: sigma = 0 exactly
    np.testing.assert_allclose(float(objective.va_opd_loss(kl, equal_va, mask, k)),
                               float(objective.va_opd_loss(kl, equal_va, mask, k, reweight=False)), rtol=1e-6)
    np.testing.assert_allclose(float(objective.va_opd_loss(kl, equal_va, mask, k, group=False)), opd, rtol=1e-6)
    # Reweight-only: sum_k w_k * token-mean, mean over prompts.
    w = np.asarray(objective.rollout_weights(va, mask, k))
    token_mean = np.asarray((kl * mask).sum(-1) / mask.sum(-1))
    np.testing.assert_allclose(float(objective.va_opd_loss(kl, va, mask, k, group=False)),
                               (w * token_mean).sum() / 2, rtol=1e-6)
    # Grouping only with lambda = 1 - lambda = 0.5 and p_v = 1: every token high, plain mean -> OPD.
    np.testing.assert_allclose(float(objective.va_opd_loss(kl, va, mask, k, reweight=False, high_fraction=1.0)),
                               opd, rtol=1e-6)
    # The config routes the same way.
    for method, (rw, gr) in {"va_opd": (True, True), "reweight_only": (True, False),
                             "group_only": (False, True)}.items():
        terms = objective.objective_terms(va, mask, k, objective.ObjectiveConfig(method=method))
        np.testing.assert_allclose(float(objective.weighted_loss(kl, terms)),
                                   float(objective.va_opd_loss(kl, va, mask, k, reweight=rw, group=gr)), rtol=1e-6)
    terms = objective.objective_terms(va, mask, k, objective.ObjectiveConfig(method="opd"))
    np.testing.assert_allclose(float(objective.weighted_loss(kl, terms)), opd, rtol=1e-6)


def test_opd_and_empty_rollouts():
    kl = jnp.ones((4, 3)) * jnp.arange(1.0, 5.0)[:, None]
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], jnp.float32)
    np.testing.assert_allclose(float(objective.opd_loss(kl, mask)), (1 + 3) / 2)
    np.testing.assert_allclose(float(reference_opd_loss(kl, mask)), (1 + 3) / 2)
    terms = objective.objective_terms(jnp.zeros((4, 3)), mask, 2, objective.ObjectiveConfig(method="opd"))
    assert int(terms.num_empty_rollouts) == 2
    np.testing.assert_allclose(float(objective.weighted_loss(kl, terms)), 2.0)
    # VA-OPD: prompt 1 (rows 2, 3) has one non-empty rollout which takes weight 1.
    terms = objective.objective_terms(jnp.zeros((4, 3)), mask, 2)
    np.testing.assert_allclose(np.asarray(terms.rollout_weights), [1, 0, 1, 0])
    np.testing.assert_allclose(float(objective.weighted_loss(kl, terms)), (1 + 3) / 2)
    # All empty: loss 0, finite, gradient 0.
    zero_mask = jnp.zeros((4, 3))
    grad = jax.grad(lambda x: objective.va_opd_loss(x, jnp.zeros((4, 3)), zero_mask, 2))(kl)
    assert float(objective.va_opd_loss(kl, jnp.zeros((4, 3)), zero_mask, 2)) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # A prompt with only empty rollouts is excluded from the prompt mean.
    mask2 = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], jnp.float32)
    np.testing.assert_allclose(float(objective.va_opd_loss(kl, jnp.zeros((4, 3)), mask2, 2)),
                               0.5 * 1 + 0.5 * 2, rtol=1e-6)


def test_loss_gradient_flows_only_through_kl():
    va = jnp.array([[0.1, 0.5, 0.2, 0.0, 0.3], [0.0, 0.1, 0.2, 0.3, 0.4]])
    mask = jnp.ones_like(va)
    kl = jnp.ones_like(va)
    grad_kl, grad_va = jax.grad(lambda a, b: objective.va_opd_loss(a, b, mask, 2), argnums=(0, 1))(kl, va)
    terms = objective.objective_terms(va, mask, 2)
    np.testing.assert_allclose(np.asarray(grad_kl), np.asarray(terms.coefficients), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad_va), 0.0)


def test_reverse_kl_properties_and_gradient():
    rng = np.random.default_rng(2)
    z_s = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)
    z_t = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)
    assert np.all(np.asarray(objective.reverse_kl(z_s, z_s)) == 0.0)
    kl = objective.reverse_kl(z_s, z_t)
    logp_s, logp_t = jax.nn.log_softmax(z_s), jax.nn.log_softmax(z_t)
    np.testing.assert_allclose(np.asarray(kl), np.asarray((jnp.exp(logp_s) * (logp_s - logp_t)).sum(-1)),
                               rtol=1e-6)
    assert np.all(np.asarray(kl) > 0)
    grad = jax.grad(lambda z: objective.reverse_kl(z, z_t).sum())(z_s)
    expected = jnp.exp(logp_s) * (logp_s - logp_t - kl[:, None])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-6)


def test_reverse_kl_excludes_padded_vocab_rows():
    rng = np.random.default_rng(3)
    z_s = rng.normal(size=(2, 10)).astype(np.float32)
    z_t = rng.normal(size=(2, 10)).astype(np.float32)
    padded_s = np.concatenate([z_s, np.full((2, 6), 5.0, np.float32)], -1)
    padded_t = np.concatenate([z_t, rng.normal(size=(2, 6)).astype(np.float32)], -1)
    kl_ref = objective.reverse_kl(jnp.asarray(z_s), jnp.asarray(z_t))
    kl_pad = objective.reverse_kl(jnp.asarray(padded_s), jnp.asarray(padded_t), valid_vocab_size=10)
    np.testing.assert_allclose(np.asarray(kl_pad), np.asarray(kl_ref), rtol=1e-6)
    grad = jax.grad(lambda z: objective.reverse_kl(z, jnp.asarray(padded_t), valid_vocab_size=10).sum())(
        jnp.asarray(padded_s))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad)[:, 10:], 0.0)


def test_objective_is_jittable_with_static_shapes():
    rng = np.random.default_rng(4)
    va = jnp.asarray(rng.exponential(0.05, (8, 16)), jnp.float32)
    kl = jnp.asarray(rng.uniform(0, 1, (8, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(16)[None] < rng.integers(0, 17, 8)[:, None], jnp.float32)
    fn = jax.jit(objective.va_opd_loss, static_argnames=("num_rollouts",))
    np.testing.assert_allclose(float(fn(kl, va, mask, num_rollouts=4)),
                               float(objective.va_opd_loss(kl, va, mask, 4)), rtol=1e-6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="high_fraction"):
        objective.ObjectiveConfig(high_fraction=0.0)
    with pytest.raises(ValueError, match="high_weight"):
        objective.ObjectiveConfig(high_weight=1.5)
    with pytest.raises(ValueError, match=r"tau=0.0: must be in \(0, inf\)"):
        objective.ObjectiveConfig(tau=0.0)
    with pytest.raises(ValueError, match="method"):
        objective.ObjectiveConfig(method="grpo")
    assert not objective.ObjectiveConfig(method="opd").needs_visual_advantage
    assert objective.ObjectiveConfig(method="group_only").group
    assert not objective.ObjectiveConfig(method="group_only").reweight
