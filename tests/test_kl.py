"""Chunked KL / log-probs against the naive full-logit computation (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaopd_jax.distill import kl as kl_lib
from vaopd_jax.distill import objective

B, T, HS, HT, V, VALID = 2, 10, 8, 12, 37, 33


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hs = jnp.asarray(rng.normal(size=(B, T, HS)), dtype)
    ws = jnp.asarray(rng.normal(size=(HS, V)) * 0.5, dtype)
    ht = jnp.asarray(rng.normal(size=(B, T, HT)), dtype)
    wt = jnp.asarray(rng.normal(size=(HT, V)) * 0.5, dtype)
    targets = jnp.asarray(rng.integers(0, VALID, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.uniform(size=(B, T)), jnp.float32)
    return hs, ws, ht, wt, targets, weights


def _naive(hs, ws, ht, wt, targets, valid=VALID):
    z_s = jnp.einsum("bth,hv->btv", hs, ws, precision="highest")
    z_t = jnp.einsum("bth,hv->btv", ht, wt, precision="highest")
    kl = objective.reverse_kl(z_s, z_t, valid_vocab_size=valid)
    z_t = z_t[..., :valid]
    z_s = z_s[..., :valid]
    pick = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1)[..., 0]
    return kl, pick(z_t), pick(z_s)


# 3 and 4 do not divide T = 10; 16 is larger than T.
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 16])
def test_chunked_values_and_grads_match_naive(chunk_size):
    hs, ws, ht, wt, targets, weights = _inputs()
    fn = jax.jit(lambda *a: kl_lib.token_kl_and_logprobs(*a, valid_vocab_size=VALID, chunk_size=chunk_size))
    kl, logp_t, logp_s = fn(hs, ws, ht, wt, targets)
    ref_kl, ref_t, ref_s = _naive(hs, ws, ht, wt, targets)
    np.testing.assert_allclose(np.asarray(kl), np.asarray(ref_kl), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logp_t), np.asarray(ref_t), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logp_s), np.asarray(ref_s), atol=1e-5)
    assert float(kl.min()) >= 0.0

    loss = lambda h, w: (kl_lib.token_kl_and_logprobs(h, w, ht, wt, targets, valid_vocab_size=VALID,
                                                      chunk_size=chunk_size)[0] * weights).sum()
    ref_loss = lambda h, w: (_naive(h, w, ht, wt, targets)[0] * weights).sum()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(hs, ws)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1))(hs, ws)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

    logp_pix = jax.jit(lambda h, w, t: kl_lib.token_logprobs(h, w, t, valid_vocab_size=VALID,
                                                            chunk_size=chunk_size))(ht, wt, targets)
    np.testing.assert_allclose(np.asarray(logp_pix), np.asarray(ref_t), atol=1e-5)


def test_padded_vocab_rows_are_excluded():
    hs, ws, ht, wt, targets, _ = _inputs(1)
    # Huge weights on the padding rows would dominate both softmaxes if they were kept.
    ws_pad = ws.at[:, VALID:].set(50.0)
    wt_pad = wt.at[:, VALID:].set(-50.0)
    got = kl_lib.token_kl_and_logprobs(hs, ws_pad, ht, wt_pad, targets, valid_vocab_size=VALID, chunk_size=4)
    want = _naive(hs, ws[:, :VALID], ht, wt[:, :VALID], targets, valid=VALID)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    grad_w = jax.grad(lambda w: kl_lib.token_kl_and_logprobs(hs, w, ht, wt_pad, targets, valid_vocab_size=VALID,
                                                             chunk_size=4)[0].sum())(ws_pad)
    np.testing.assert_array_equal(np.asarray(grad_w)[:, VALID:], 0.0)
    assert np.isfinite(np.asarray(grad_w)).all()


def test_identical_student_and_teacher_give_zero_kl_and_grad():
    hs, ws, _, _, targets, _ = _inputs(2)
    kl, _, _ = kl_lib.token_kl_and_logprobs(hs, ws, hs, ws, targets, chunk_size=4)
    np.testing.assert_array_equal(np.asarray(kl), 0.0)
    grad = jax.grad(lambda h: kl_lib.token_kl_and_logprobs(h, ws, hs, ws, targets, chunk_size=4)[0].sum())(hs)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)


def test_teacher_and_logprob_outputs_carry_no_gradient():
    hs, ws, ht, wt, targets, _ = _inputs(3)
    grads = jax.grad(lambda h, w, t: kl_lib.token_kl_and_logprobs(h, w, t, wt, targets, chunk_size=4)[1].sum()
                     + kl_lib.token_kl_and_logprobs(h, w, t, wt, targets, chunk_size=4)[2].sum(),
                     argnums=(0, 1, 2))(hs, ws, ht)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    grad_t = jax.grad(lambda t: kl_lib.token_kl_and_logprobs(hs, ws, t, wt, targets, chunk_size=4)[0].sum())(ht)
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)


def test_bf16_inputs_give_fp32_outputs_close_to_fp32():
    hs, ws, ht, wt, targets, _ = _inputs(4)
    kl32, _, _ = kl_lib.token_kl_and_logprobs(hs, ws, ht, wt, targets, chunk_size=4)
    bf = lambda x: x.astype(jnp.bfloat16)
    kl16, logp16, _ = kl_lib.token_kl_and_logprobs(bf(hs), bf(ws), bf(ht), bf(wt), targets, chunk_size=4)
    assert kl16.dtype == jnp.float32 and logp16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(kl16), np.asarray(kl32), rtol=0.1, atol=0.05)
    grad = jax.grad(lambda h: kl_lib.token_kl_and_logprobs(h, bf(ws), bf(ht), bf(wt), targets,
                                                           chunk_size=4)[0].sum())(bf(hs))
    assert grad.dtype == jnp.bfloat16


def test_peak_memory_does_not_hold_full_logits():
    # Full logits for the batch: 2 * 512 * 4096 * 4 B = 16 MiB per model; one chunk of 32: 1 MiB.
    b, t, h, v = 2, 512, 16, 4096
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

    def loss(hs, ws, ht, wt, targets):
        return kl_lib.token_kl_and_logprobs(hs, ws, ht, wt, targets, chunk_size=32)[0].sum()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        spec(b, t, h), spec(h, v), spec(b, t, h), spec(h, v), jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = b * t * v * 4
    assert temp < full_logits / 2, f"temp {temp} bytes vs full logits {full_logits} bytes"


def test_shape_errors_are_clear():
    hs, ws, ht, wt, targets, _ = _inputs()
    with pytest.raises(ValueError, match="vocab"):
        kl_lib.token_kl_and_logprobs(hs, ws, ht, wt[:, :5], targets)
    with pytest.raises(ValueError, match="chunk_size=0"):
        kl_lib.token_logprobs(ht, wt, targets, chunk_size=0)
