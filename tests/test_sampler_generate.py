"""The rollout sampler end to end on tiny random Qwen3-VL models: greedy parity with transformers'
`generate`, prefix sharing, reproducibility, mask rules, padded vocab rows, compile buckets, errors.

Compilation dominates the run time on CPU, so the tests share a few programs: one greedy program for the
transformers comparison, one for prefix sharing, and one sampling program (B = 2, K = 4, temperature 1)
reused by several tests (end-token ids, pad id and valid vocab size are data, not program keys).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing
from vaopd_jax.rollout import sampler
from references import require

EOS = (7, 9)
N_NEW = 12
# Text only (two lengths), one image, two images of different sizes: the batch mixes all three kinds.
MIXED_IMAGES = [[], [(1, 4, 4)], [(1, 4, 6), (1, 8, 4)], []]
MIXED_TEXT = [6, 3, 2, 11]


@pytest.fixture(scope="module")
def pair():
    """(transformers reference, our model with the same weights, config)."""
    require("torch")
    cfg = testing.tiny_config()
    hf = testing.hf_reference_model(cfg, seed=0)
    return hf, testing.model_from_hf(hf, cfg), cfg


@pytest.fixture(scope="module")
def mixed(pair):
    """The mixed batch and its greedy rollout (one sample per prompt)."""
    _, model, cfg = pair
    batch = testing.make_batch(cfg, MIXED_IMAGES, MIXED_TEXT, seed=1)
    out = sampler.generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                           max_new_tokens=N_NEW, temperature=0.0, eos_token_ids=EOS)
    return batch, out


def _row_images(cfg, batch):
    """Per prompt row: (pixel rows, grid rows) of its own images, in order."""
    merge = cfg.vision.merge_unit
    out, img, pix = [], 0, 0
    for row in range(batch.input_ids.shape[0]):
        n_tok = int((batch.input_ids[row][batch.attention_mask[row] == 1] == cfg.image_token_id).sum())
        grids = []
        while n_tok > 0:
            g = batch.image_grid_thw[img]
            grids.append(g)
            n_tok -= int(np.prod(g)) // merge
            img += 1
        n_pix = int(sum(np.prod(g) for g in grids))
        out.append((batch.pixel_values[pix:pix + n_pix] if grids else None, np.array(grids) if grids else None))
        pix += n_pix
    return out


def _hf_greedy(hf, cfg, batch, max_new_tokens):
    """transformers' greedy generate, one unpadded prompt at a time (no padding conventions involved)."""
    import torch

    results = []
    for row, (pixels, grids) in enumerate(_row_images(cfg, batch)):
        n = int(batch.attention_mask[row].sum())
        ids = torch.tensor(batch.input_ids[row:row + 1, :n], dtype=torch.long)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        if pixels is not None:
            kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                          mm_token_type_ids=(ids == cfg.image_token_id).to(torch.int32))
        with torch.no_grad():
            seq = hf.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(EOS),
                              pad_token_id=EOS[0], use_cache=True)
        results.append(seq[0, n:].numpy())
    return results


def test_greedy_equals_transformers_generate(pair, mixed):
    """Text-only prompts, prompts with one / two images of different sizes, different lengths, one batch."""
    hf, _, cfg = pair
    batch, out = mixed
    assert out.tokens.shape == (len(MIXED_TEXT), N_NEW) and out.tokens.dtype == jnp.int32
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row, ref in enumerate(_hf_greedy(hf, cfg, batch, N_NEW)):
        assert lengths[row] == len(ref), (row, lengths[row], ref)
        np.testing.assert_array_equal(tokens[row, :len(ref)], ref, err_msg=f"row {row}")


def test_prefix_sharing_equals_separate_prefills(pair, mixed):
    """K samples after ONE prefill per prompt == each prompt prefilled on its own (greedy)."""
    _, model, _ = pair
    batch, single = mixed
    shared = sampler.generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values,
                              batch.image_grid_thw, max_new_tokens=N_NEW, num_samples=3, temperature=0.0,
                              eos_token_ids=EOS)
    assert shared.tokens.shape == (3 * len(MIXED_TEXT), N_NEW)
    # Samples of one prompt are adjacent: rows 3b, 3b+1, 3b+2 belong to prompt b.
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.repeat(np.asarray(single.tokens), 3, axis=0))
    np.testing.assert_array_equal(np.asarray(shared.lengths), np.repeat(np.asarray(single.lengths), 3))
    np.testing.assert_allclose(np.asarray(shared.model_logprobs),
                               np.repeat(np.asarray(single.model_logprobs), 3, axis=0), atol=1e-5)


# ----------------------------------------------------------------------------- sampling program (B=2, K=4)
@pytest.fixture(scope="module")
def small_model():
    cfg = testing.tiny_config(text=dict(vocab_size=64, num_hidden_layers=2), image_token_id=60,
                              video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    return qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(3)), cfg


def _sample(model, batch, **kw):
    kw = dict(dict(max_new_tokens=10, num_samples=4, temperature=1.0, eos_token_ids=(3,), rng=0), **kw)
    return sampler.generate(model, batch.input_ids, batch.attention_mask, **kw)


def test_sampling_reproducible_with_fixed_key(small_model):
    model, cfg = small_model
    batch = testing.make_batch(cfg, [[], []], [5, 8], seed=0)
    a = _sample(model, batch, rng=jax.random.key(5))
    b = _sample(model, batch, rng=jax.random.key(5))
    c = _sample(model, batch, rng=jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # The K samples of one prompt are independent draws after the shared prefill.
    assert (np.asarray(a.tokens[0]) != np.asarray(a.tokens[1])).any()
    # Temperature 1, no filtering: the sampling distribution is the model's.
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(a.model_logprobs), atol=1e-6)


def test_model_logprobs_equal_teacher_forcing_forward(small_model):
    model, cfg = small_model
    batch = testing.make_batch(cfg, [[], []], [4, 7], seed=4)
    # valid_vocab_size=60 keeps the special (image) ids 60-63 out, and defines the normalization.
    out = _sample(model, batch, rng=1, valid_vocab_size=60)
    seqs, rows = np.zeros((8, 24), np.int32), []
    for r in range(8):
        prompt = batch.input_ids[r // 4, :int(batch.attention_mask[r // 4].sum())]
        k = int(out.lengths[r])
        seq = np.concatenate([prompt, np.asarray(out.tokens[r, :k])])
        seqs[r, :len(seq)] = seq
        rows.append((len(prompt), k))
    mask = np.arange(24) < np.array([n + k for n, k in rows])[:, None]
    positions, _ = qwen3_vl.get_rope_index(seqs, None, mask, cfg)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, m, p: nnx.merge(graphdef, s)(x, m, position_ids=p))
    logits = forward(state, seqs, mask.astype(np.int32), positions)
    logp = np.asarray(jax.nn.log_softmax(logits[..., :60], axis=-1))
    for r, (n, k) in enumerate(rows):
        ref = np.take_along_axis(logp[r, n - 1:n - 1 + k], seqs[r, n:n + k, None], axis=-1)[:, 0]
        np.testing.assert_allclose(np.asarray(out.model_logprobs[r, :k]), ref, atol=1e-4)


def test_end_tokens_masks_and_padding(small_model):
    model, cfg = small_model
    batch = testing.make_batch(cfg, [[], []], [5, 5], seed=7)
    eos = tuple(range(0, 8))  # several end ids: most rows stop early, some are truncated
    out = _sample(model, batch, eos_token_ids=eos, pad_token_id=59)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    lengths, finished = np.asarray(out.lengths), np.asarray(out.finished)
    assert finished.any() and (lengths < 10).any()
    for row in range(tokens.shape[0]):
        k = lengths[row]
        is_end = np.isin(tokens[row, :k], eos)
        if finished[row]:
            assert is_end[-1] and not is_end[:-1].any()  # the first end token closes the response
        else:
            assert k == 10 and not is_end.any()  # truncated: keeps all tokens
        np.testing.assert_array_equal(mask[row], np.arange(10) < k)
        assert (tokens[row, k:] == 59).all()
        assert (np.asarray(out.logprobs)[row, k:] == 0).all()


def test_compacting_finished_rows_keeps_every_token(small_model):
    """16 rows decode in two stages (16 rows, then the <= 4 unfinished ones, rollout/decode.py): the same tokens
    and log-probs as decoding all 16 rows to the end, for rows that end early, late and never."""
    from vaopd_jax.rollout import decode

    model, cfg = small_model
    assert decode.compaction_schedule(16) == (16, 4)
    batch = testing.make_batch(cfg, [[], [], [], []], [5, 3, 8, 6], seed=9)
    kw = dict(max_new_tokens=24, eos_token_ids=tuple(range(0, 6)), pad_token_id=59, rng=4)
    staged = _sample(model, batch, **kw)
    single = _sample(model, batch, decode_stages=1, **kw)
    lengths = np.asarray(staged.lengths)
    # The batch exercises the second stage: once only 4 rows are left, some of them still run for several steps.
    assert np.sort(lengths)[-5] + 3 <= lengths.max() and (lengths == 24).any(), lengths
    for field in ("tokens", "response_mask", "lengths", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(staged, field)), np.asarray(getattr(single, field)))
    np.testing.assert_allclose(np.asarray(staged.logprobs), np.asarray(single.logprobs), atol=1e-6)
    np.testing.assert_allclose(np.asarray(staged.model_logprobs), np.asarray(single.model_logprobs), atol=1e-6)
    with pytest.raises(ValueError, match="decode_stages"):
        _sample(model, batch, decode_stages=0, **kw)


def test_padded_vocab_rows_never_emitted(small_model):
    model, cfg = small_model
    batch = testing.make_batch(cfg, [[], []], [6, 6], seed=8)
    out = _sample(model, batch, max_new_tokens=16, eos_token_ids=(), valid_vocab_size=5, pad_token_id=0, rng=2)
    tokens = np.asarray(out.tokens)
    assert tokens.max() < 5 and len(np.unique(tokens)) == 5
    assert np.asarray(out.finished).sum() == 0 and (np.asarray(out.lengths) == 16).all()


def test_suppressed_token_ids_never_emitted(small_model):
    model, cfg = small_model
    batch = testing.make_batch(cfg, [[], []], [6, 6], seed=8)
    kw = dict(max_new_tokens=16, eos_token_ids=(), pad_token_id=0, rng=2)
    vision_ids = [60, 61, 62, 63]  # small_model's image / video / vision start / vision end ids
    free = np.asarray(_sample(model, batch, suppress_token_ids=(), **kw).tokens)
    assert np.isin(free, vision_ids).any()  # without suppression this key does draw vision ids
    default = np.asarray(_sample(model, batch, **kw).tokens)
    assert not np.isin(default, vision_ids).any()
    # Masked like padded vocab rows: only the 5 unsuppressed ids remain, and all of them are drawn.
    few = _sample(model, batch, suppress_token_ids=range(5, 64), **kw)
    assert np.asarray(few.tokens).max() < 5 and len(np.unique(np.asarray(few.tokens))) == 5
    assert np.isfinite(np.asarray(few.model_logprobs)).all()
    with pytest.raises(ValueError, match="suppress_token_ids"):
        _sample(model, batch, suppress_token_ids=(-3,), **kw)
    with pytest.raises(ValueError, match="leave no token"):
        _sample(model, batch, suppress_token_ids=range(64), **kw)


def test_compile_count_uses_buckets(small_model):
    model, cfg = small_model
    first = None
    for lens, n_new in [([5, 8], 10), ([3, 12], 13), ([9, 2], 16)]:  # all in bucket (16 prompt, 16 new)
        _sample(model, testing.make_batch(cfg, [[], []], lens, seed=1), max_new_tokens=n_new)
        first = sampler.compile_count() if first is None else first
    assert sampler.compile_count() == first  # same bucket: no new program
    out = _sample(model, testing.make_batch(cfg, [[], []], [20, 3], seed=1), max_new_tokens=5)
    assert sampler.compile_count() == first + 1 and out.tokens.shape == (8, 5)  # prompt bucket 32


def test_clear_errors(small_model):
    model, cfg = small_model
    batch = testing.make_batch(cfg, [[(1, 4, 4)]], [3], seed=0)
    ids, mask = batch.input_ids, batch.attention_mask
    with pytest.raises(ValueError, match="empty batch"):
        sampler.generate(model, ids[:0], mask[:0], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_length=20"):
        sampler.generate(model, ids, mask, batch.pixel_values, batch.image_grid_thw, max_new_tokens=9,
                         max_length=20, eos_token_ids=(3,))
    with pytest.raises(ValueError, match=re.escape("4 <|image_pad|> tokens but image_grid_thw has 8")):
        sampler.generate(model, ids, mask, np.zeros((32, cfg.vision.patch_dim), np.float32),
                         np.array([[1, 4, 8]]), max_new_tokens=4, eos_token_ids=(3,))
    with pytest.raises(ValueError, match="no pixel_values"):
        sampler.generate(model, ids, mask, max_new_tokens=4, eos_token_ids=(3,))
    with pytest.raises(ValueError, match="pixel_values shape"):
        sampler.generate(model, ids, mask, batch.pixel_values[:8], batch.image_grid_thw, max_new_tokens=4,
                         eos_token_ids=(3,))
    with pytest.raises(ValueError, match="eos_token_ids entry 151645"):
        sampler.generate(model, ids, mask, batch.pixel_values, batch.image_grid_thw, max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate(model, ids, mask, batch.pixel_values, batch.image_grid_thw, max_new_tokens=4,
                         top_p=1.5, eos_token_ids=(3,))
    text = testing.make_batch(cfg, [[], []], [3, 6], seed=0)
    with pytest.raises(ValueError, match="right-padded"):
        sampler.generate(model, text.input_ids, text.attention_mask[:, ::-1], max_new_tokens=4, eos_token_ids=(3,))
