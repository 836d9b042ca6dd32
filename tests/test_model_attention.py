"""Chunked attention == jax.nn.dot_product_attention (values and gradients, fp32), and the model routed through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaopd_jax.models.qwen3_vl.attention import MaskSpec, attend, chunked_attention

TOL = 1e-5


def _qkv(b, t, n, kh, d, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kh, d)), jnp.float32)
    return q, k, v


def _reference(q, k, v, spec):
    return jax.nn.dot_product_attention(q, k, v, mask=spec.dense(q.shape[0], q.shape[1], k.shape[1]),
                                        implementation="xla")


def _check(q, k, v, spec, chunk_size):
    """Values and gradients (w.r.t. q, k, v of a random projection of the output) agree within TOL."""
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
    ours = jax.jit(lambda q, k, v: chunked_attention(q, k, v, spec, chunk_size=chunk_size))
    ref = jax.jit(lambda q, k, v: _reference(q, k, v, spec))
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=TOL, rtol=TOL)
    g_ours = jax.jit(jax.grad(lambda q, k, v: jnp.sum(chunked_attention(q, k, v, spec, chunk_size=chunk_size) * cot),
                              argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_reference(q, k, v, spec) * cot), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, atol=TOL, rtol=TOL)


def test_causal_padding_gqa_chunk_not_dividing_t():
    # T=13 with chunk 4: 4 chunks, 3 padded query rows; 4 query heads share 2 KV heads; row 1 right-padded.
    q, k, v = _qkv(2, 13, 4, 2, 8)
    key_valid = jnp.asarray(np.arange(13)[None] < np.array([[13], [9]]))
    _check(q, k, v, MaskSpec(key_valid=key_valid, causal=True), chunk_size=4)


def test_segments_bidirectional():
    # Vision: three image frames of 5, 4 and 7 patches, attention within a frame only.
    q, k, v = _qkv(1, 16, 2, 2, 8, seed=1)
    seg = jnp.asarray(np.repeat([0, 1, 2], [5, 4, 7])[None], jnp.int32)
    _check(q, k, v, MaskSpec(segment_ids=seg), chunk_size=6)


def test_no_mask_single_chunk_and_fully_masked_rows():
    q, k, v = _qkv(1, 7, 6, 3, 4, seed=2)
    _check(q, k, v, MaskSpec(), chunk_size=64)  # chunk larger than T: one chunk
    # A row whose keys are all padding: both paths give the mean of the values (masked softmax is uniform).
    spec = MaskSpec(key_valid=jnp.zeros((1, 7), bool))
    np.testing.assert_allclose(chunked_attention(q, k, v, spec, chunk_size=3), _reference(q, k, v, spec), atol=TOL)


def test_scores_not_materialized_for_whole_sequence():
    # The compiled forward+backward keeps no (B, N, T, T) buffer: temp memory stays far below one score matrix.
    b, t, n, kh, d = 1, 2048, 4, 2, 16
    spec = MaskSpec(key_valid=jnp.ones((b, t), bool), causal=True)
    args = [jax.ShapeDtypeStruct((b, t, n, d), jnp.float32)] + [jax.ShapeDtypeStruct((b, t, kh, d), jnp.float32)] * 2

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    scores, chunk = b * n * t * t * 4, 128
    chunked = temp_bytes(lambda q, k, v: chunked_attention(q, k, v, spec, chunk_size=chunk))
    dense = temp_bytes(lambda q, k, v: _reference(q, k, v, spec))
    assert dense >= scores, (dense, scores)
    # Measured: about 4 block-sized (B, N, chunk, T) fp32 buffers (scores, probabilities and their cotangents).
    assert chunked < 6 * b * n * chunk * t * 4 < scores, (chunked, scores)


def test_attend_dispatch_and_errors():
    q, k, v = _qkv(1, 5, 2, 1, 4, seed=3)
    spec = MaskSpec(causal=True)
    dense_mask = spec.dense(1, 5, 5)
    np.testing.assert_allclose(attend(q, k, v, spec, "chunked", chunk_size=2), attend(q, k, v, dense_mask), atol=TOL)
    np.testing.assert_allclose(attend(q, k, v, spec, "xla"), attend(q, k, v, dense_mask), atol=TOL)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attend(q, k, v, spec, "flash")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        chunked_attention(q[:, :, :1].repeat(3, axis=2), k.repeat(2, axis=2), v.repeat(2, axis=2), spec)


def test_model_chunked_equals_xla_logits():
    """Tiny Qwen3-VL: attention_impl='chunked' (chunk 5: does not divide T, several chunks per image frame) gives
    the logits of the 'xla' path; two images in one row (vision segments), right padding. (Gradients are
    compared at the attention level above; the model test stays one forward compile per impl.)"""
    from flax import nnx

    from vaopd_jax.models import qwen3_vl
    from vaopd_jax.models.qwen3_vl import testing

    base = testing.tiny_config()
    batch = testing.make_batch(base, [[(1, 4, 4), (1, 4, 6)], [(1, 8, 4)]], [3, 2], seed=0)
    logits = {}
    for impl in ("xla", "chunked"):
        cfg = base.replace(attention_impl=impl, attention_chunk_size=5)
        model = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(0))  # same seed: same weights
        logits[impl] = np.asarray(model(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        batch.image_grid_thw))
    assert logits["xla"].shape == (2, batch.input_ids.shape[1], base.text.vocab_size)
    assert batch.attention_mask.min() == 0  # the padding path is exercised
    np.testing.assert_allclose(logits["chunked"], logits["xla"], atol=1e-5, rtol=1e-5)


def test_config_rejects_unknown_attention_impl():
    from vaopd_jax.models.qwen3_vl import testing

    with pytest.raises(ValueError, match="attention_impl must be one of"):
        testing.tiny_config(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_chunk_size must be >= 1"):
        testing.tiny_config(attention_chunk_size=0)
