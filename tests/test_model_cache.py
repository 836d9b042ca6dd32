"""KV cache: prefill + decode_step logits equal the full forward on the concatenated sequence; the block-wise
attention reads only the filled slots; decode_step on indexed rows equals it on those rows alone."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing


@nnx.jit(static_argnames=("last_only",))
def _prefill(model, ids, mask, pos, pixels, vi, cache, last_only):
    embeds, ds = model.encode_images(pixels, vi)
    return model.prefill(ids, mask, pos, image_embeds=embeds, deepstack_embeds=ds, cache=cache, last_only=last_only)


@nnx.jit
def _decode(model, tok, pos, cache, index):
    return model.decode_step(tok, pos, cache, index)


def test_prefill_then_decode_equals_full_forward():
    cfg = testing.tiny_config()
    model = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(3))
    # Two right-padded prompts with images of different sizes (different prompt lengths and rope deltas).
    prompt = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4), (1, 4, 4)]], [5, 2], seed=11)
    b, t = prompt.input_ids.shape
    lens = prompt.attention_mask.sum(1)
    steps = 4
    gen = np.random.default_rng(0).integers(0, 400, size=(b, steps)).astype(np.int32)

    # Reference: full forward over each row's contiguous sequence prompt_b + generated tokens.
    full_ids, full_mask = testing.with_generated(prompt, gen)
    vi = qwen3_vl.prepare_vision_inputs(prompt.image_grid_thw, cfg)
    full = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask), jnp.asarray(prompt.pixel_values),
                            prompt.image_grid_thw))

    pos, delta = qwen3_vl.get_rope_index(prompt.input_ids, prompt.image_grid_thw, prompt.attention_mask, cfg)
    cache = model.init_cache(b, t + steps)
    assert cache.k.shape == (cfg.text.num_hidden_layers, b, cfg.text.num_key_value_heads, t + steps,
                             cfg.text.head_dim)
    last, cache = _prefill(model, prompt.input_ids, prompt.attention_mask, pos, prompt.pixel_values, vi, cache,
                           last_only=True)
    assert last.shape == (b, cfg.text.vocab_size)
    np.testing.assert_allclose(np.asarray(last), full[np.arange(b), lens - 1], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :t]), prompt.attention_mask.astype(bool))
    for j in range(steps):
        # Decoded tokens go to the same slot t + j in every row; their rope position is len_b + j + delta_b.
        step_pos = np.broadcast_to((lens + j + delta)[None, :, None], (3, b, 1)).astype(np.int32)
        logits, cache = _decode(model, gen[:, j:j + 1], step_pos, cache, t + j)
        assert logits.shape == (b, 1, cfg.text.vocab_size)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[np.arange(b), lens + j], atol=1e-4, rtol=0)
    assert bool(cache.valid[:, t:].all())
    # Sanity: the padded slots of the shorter prompt stay masked out.
    assert not bool(cache.valid[np.argmin(lens), lens.min():t].any())


def test_decode_attention_equals_dense_attention_with_gqa():
    """Grouped single-query attention over the (B, K, S, D) cache + the new key == dot_product_attention over
    the cache with the new key written into its slot (repeat_kv GQA, key padding)."""
    from vaopd_jax.models.qwen3_vl.text import decode_attention

    rng = np.random.default_rng(0)
    b, n, kh, s, d, slot = 3, 6, 2, 10, 8, 7
    q = rng.standard_normal((b, n, d), np.float32)
    k_cache, v_cache = (rng.standard_normal((b, kh, s, d), np.float32) for _ in range(2))
    k_new, v_new = (rng.standard_normal((b, kh, d), np.float32) for _ in range(2))
    valid = (np.arange(s)[None, :] < slot) & (rng.random((b, s)) > 0.3)
    valid[:, 0] = True
    out = np.asarray(decode_attention(jnp.asarray(q), k_new, v_new, k_cache, v_cache, jnp.asarray(valid)))

    k_full, v_full = k_cache.copy(), v_cache.copy()
    k_full[:, :, slot], v_full[:, :, slot] = k_new, v_new
    mask = valid.copy()
    mask[:, slot] = True
    to_bskd = lambda a: jnp.asarray(a.transpose(0, 2, 1, 3))  # noqa: E731
    ref = jax.nn.dot_product_attention(jnp.asarray(q)[:, None], to_bskd(k_full), to_bskd(v_full),
                                       mask=jnp.asarray(mask)[:, None, None, :])[:, 0]
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5, rtol=0)
    # Masked slots do not matter: changing them leaves the output unchanged.
    k_cache[~valid[:, None, :].repeat(kh, 1)] = 1e3
    again = decode_attention(jnp.asarray(q), k_new, v_new, k_cache, v_cache, jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(again), out, atol=1e-6, rtol=0)
    # Blocks that do not divide the slots (the last block overlaps the one before it) give the same result.
    for block in (1, 3, 4, 10):
        blocked = decode_attention(jnp.asarray(q), k_new, v_new, k_cache, v_cache, jnp.asarray(valid),
                                   block_size=block)
        np.testing.assert_allclose(np.asarray(blocked), out, atol=1e-5, rtol=0, err_msg=f"block {block}")


def test_cached_attention_reads_only_filled_slots_of_its_layer_and_rows():
    """Other layers are never read (NaN there leaves the output finite); slots >= filled hold garbage (the last
    block may overlap them) that is masked out: the output equals attention over the filled slots. Indexed rows
    (in groups) read their own cache rows."""
    from vaopd_jax.models.qwen3_vl.text import cached_attention

    rng = np.random.default_rng(1)
    layers, b, n, kh, s, d, filled = 3, 4, 4, 2, 23, 8, 13
    cache_k, cache_v = (rng.standard_normal((layers, b, kh, s, d), np.float32) for _ in range(2))
    q = rng.standard_normal((b, n, d), np.float32)
    k_new, v_new = (rng.standard_normal((b, kh, d), np.float32) for _ in range(2))
    valid = rng.random((b, s)) > 0.2
    ref = cached_attention(q, k_new, v_new, cache_k[1:2, :, :, :filled], cache_v[1:2, :, :, :filled],
                           valid[:, :filled], 0, filled, block_size=filled)
    poisoned_k, poisoned_v = cache_k.copy(), cache_v.copy()
    for a in (poisoned_k, poisoned_v):
        a[:, :, :, filled:] = 1e30
        a[0], a[2] = np.nan, np.nan
    # chunk_bytes=1: one row at a time (lax.map over row chunks), as on CPU for big batches.
    for block, chunk_bytes in ((4, None), (5, None), (128, None), (4, 1)):
        out = cached_attention(q, k_new, v_new, poisoned_k, poisoned_v, valid, 1, filled, block_size=block,
                               chunk_bytes=chunk_bytes)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0,
                                   err_msg=f"block {block}, chunk_bytes {chunk_bytes}")
    # Rows [1, 0 | 3, 2] in two groups of the batch: row i of the output is cache row rows[i]'s attention.
    rows = np.array([1, 0, 3, 2], np.int32)
    for chunk_bytes in (None, 1):
        picked = cached_attention(q[rows], k_new[rows], v_new[rows], poisoned_k, poisoned_v, valid, 1, filled,
                                  rows=jnp.asarray(rows), row_groups=2, block_size=4, chunk_bytes=chunk_bytes)
        np.testing.assert_allclose(np.asarray(picked), np.asarray(ref)[rows], atol=1e-5, rtol=0)


def test_decode_step_on_indexed_rows_equals_decode_of_those_rows():
    """decode_step(rows=..., write=...) gives the logits of decoding those cache rows alone, writes their new
    key/value into their own rows at the slot, and leaves unwritten (write=False) and other rows unchanged."""
    cfg = testing.tiny_config()
    model = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(5))
    b, slots, index = 4, 12, 7
    rng = np.random.default_rng(2)
    t = cfg.text
    shape = (t.num_hidden_layers, b, t.num_key_value_heads, slots, t.head_dim)
    cache = qwen3_vl.KVCache(k=jnp.asarray(rng.standard_normal(shape, np.float32)),
                             v=jnp.asarray(rng.standard_normal(shape, np.float32)),
                             valid=jnp.asarray(np.arange(slots)[None, :] < np.array([[7], [5], [6], [7]])))
    tokens = rng.integers(0, 400, (b, 1)).astype(np.int32)
    positions = np.broadcast_to(np.array([9, 6, 8, 7])[None, :, None], (3, b, 1)).astype(np.int32)
    full_logits, full_cache = _decode(model, tokens, positions, cache, index)

    # Two groups of two cache rows: group 0 decodes rows 1 and 0, group 1 decodes row 3 and a padding copy of
    # it (write False).
    rows = np.array([1, 0, 3, 3], np.int32)
    write = np.array([True, True, True, False])

    @nnx.jit
    def decode_rows(model, tok, pos, cache, index, rows, write):
        return model.decode_step(tok, pos, cache, index, rows=rows, write=write, row_groups=2)

    logits, new_cache = decode_rows(model, tokens[rows], positions[:, rows], cache, index, rows, write)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits)[rows], atol=1e-5, rtol=0)
    for name in ("k", "v", "valid"):
        got, full, old = (np.asarray(getattr(c, name)) for c in (new_cache, full_cache, cache))
        axis = 0 if name == "valid" else 1
        for row in range(b):
            want = full if row in (0, 1, 3) else old  # row 2 was not decoded
            np.testing.assert_allclose(np.take(got, row, axis=axis), np.take(want, row, axis=axis), atol=1e-6,
                                       err_msg=f"{name} row {row}")


def test_cached_attention_in_bfloat16_uses_dots_and_matches_fp32():
    """A bfloat16 cache takes the dot path (fp32 accumulation): the output is bfloat16 and within bfloat16
    rounding of the fp32 attention over the same (rounded) inputs, blocks and row chunks included."""
    from vaopd_jax.models.qwen3_vl.text import cached_attention

    rng = np.random.default_rng(3)
    layers, b, n, kh, s, d, filled = 2, 4, 4, 2, 40, 16, 29
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    cache_k, cache_v = (bf16(rng.standard_normal((layers, b, kh, s, d))) for _ in range(2))
    q = bf16(rng.standard_normal((b, n, d)))
    k_new, v_new = (bf16(rng.standard_normal((b, kh, d))) for _ in range(2))
    valid = jnp.asarray(rng.random((b, s)) > 0.2)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = np.asarray(cached_attention(f32(q), f32(k_new), f32(v_new), f32(cache_k), f32(cache_v), valid, 1, filled,
                                      block_size=filled))
    for block, chunk_bytes in ((8, None), (128, None), (8, 1)):
        out = cached_attention(q, k_new, v_new, cache_k, cache_v, valid, 1, filled, block_size=block,
                               chunk_bytes=chunk_bytes)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=0,
                                   err_msg=f"block {block}, chunk_bytes {chunk_bytes}")


def test_write_cache_and_grouped_row_helpers():
    """write_cache: without rows one column write; with write=False rows left as they were; scatter_rows_grouped
    drops entries that point outside their group or out of range; gather_rows reads within each group."""
    from vaopd_jax.models.qwen3_vl.model import scatter_rows_grouped, write_cache
    from vaopd_jax.models.qwen3_vl.text import gather_rows

    rng = np.random.default_rng(4)
    layers, b, kh, s, d, index = 2, 4, 1, 6, 3, 4
    shape = (layers, b, kh, s, d)
    cache = qwen3_vl.KVCache(k=jnp.asarray(rng.standard_normal(shape, np.float32)),
                             v=jnp.asarray(rng.standard_normal(shape, np.float32)),
                             valid=jnp.asarray(np.arange(s)[None, :] < 3).repeat(b, 0))
    k_new, v_new = (jnp.asarray(rng.standard_normal((layers, b, kh, d), np.float32)) for _ in range(2))
    every = write_cache(cache, k_new, v_new, index)
    np.testing.assert_array_equal(np.asarray(every.k[:, :, :, index]), np.asarray(k_new))
    np.testing.assert_array_equal(np.asarray(every.v[:, :, :, index]), np.asarray(v_new))
    np.testing.assert_array_equal(np.asarray(every.k[:, :, :, :index]), np.asarray(cache.k[:, :, :, :index]))
    assert bool(every.valid[:, index].all()) and not bool(every.valid[:, index + 1:].any())

    masked = write_cache(cache, k_new, v_new, index, write=jnp.asarray([True, False, True, False]))
    for row, written in enumerate([True, False, True, False]):
        want = every if written else cache
        np.testing.assert_array_equal(np.asarray(masked.k[:, row]), np.asarray(want.k[:, row]))
        np.testing.assert_array_equal(np.asarray(masked.v[:, row]), np.asarray(want.v[:, row]))
        assert bool(masked.valid[row, index]) == written

    x = jnp.zeros((b, 2))
    values = jnp.arange(1.0, 9.0).reshape(b, 2)
    # Two groups of two rows: entries 0-1 belong to rows {0, 1}, entries 2-3 to rows {2, 3}. Entry 1 points into
    # the other group and entry 3 out of range: both dropped.
    out = np.asarray(scatter_rows_grouped(x, values, jnp.asarray([1, 2, 3, 4]), 2, axis=0))
    np.testing.assert_array_equal(out, [[0, 0], [1, 2], [0, 0], [5, 6]])
    table = jnp.arange(8.0).reshape(b, 2)
    np.testing.assert_array_equal(np.asarray(gather_rows(table, jnp.asarray([1, 1, 3, 2]), 2)),
                                  [[2, 3], [2, 3], [6, 7], [4, 5]])
    np.testing.assert_array_equal(np.asarray(gather_rows(table, jnp.asarray([3, 0]))), [[6, 7], [0, 1]])
