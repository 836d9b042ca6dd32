"""Logits and component parity of the Flax Qwen3-VL port against transformers (fp32, eager, tiny configs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import require

torch = require("torch")

from vaopd_jax.models import qwen3_vl  # noqa: E402
from vaopd_jax.models.qwen3_vl import testing  # noqa: E402

TOL = 1e-4

# (name, images per sample, text run lengths)
CASES = [
    ("text_only", [[], []], [9, 5]),
    ("one_image", [[(1, 4, 6)], []], [3, 6]),
    ("two_sizes_right_padding", [[(1, 4, 6)], [(1, 8, 4)]], [4, 2]),
    ("two_images_one_sample", [[(1, 4, 4), (1, 6, 4)], []], [3, 4]),
    ("mixed", [[(1, 8, 4), (1, 4, 4)], [(1, 4, 6)]], [2, 5]),
]

CONFIGS = {
    "untied_ds02": dict(tie_word_embeddings=False),
    "tied_ds012": dict(tie_word_embeddings=True, vision=dict(deepstack_visual_indexes=(0, 1, 2))),
}


def _pair(name):
    return testing.reference_pair(testing.tiny_config(**CONFIGS[name]))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return _pair(request.param)


@pytest.fixture(scope="module")
def tied_pair():
    return _pair("tied_ds012")


SEQ_LEN = 40  # every case is right-padded to this length and PATCH_ROWS pixel rows: one compilation per config
PATCH_ROWS = 128


def _ours(model, batch):
    """Our logits with the batch's pixel rows padded to PATCH_ROWS (the bucketed path)."""
    pv = None
    if batch.pixel_values is not None:
        pad = PATCH_ROWS - batch.pixel_values.shape[0]
        pv = jnp.asarray(np.pad(batch.pixel_values, ((0, pad), (0, 0)), constant_values=3.0))
    return np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), pv,
                            batch.image_grid_thw))


@pytest.mark.parametrize("name,images,lens", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers(pair, name, images, lens):
    cfg, hf, model = pair
    batch = testing.make_batch(cfg, images, lens, seed=len(name), pad_to=SEQ_LEN)
    ref = testing.hf_logits(hf, batch)
    out = _ours(model, batch)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # logits are O(1): the tolerance is meaningful
    valid = batch.attention_mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= TOL


def test_position_ids_match_transformers(pair):
    cfg, hf, _ = pair
    for name, images, lens in CASES[1:]:
        batch = testing.make_batch(cfg, images, lens, seed=3)
        ref_pos, ref_delta = hf.model.get_rope_index(
            torch.tensor(batch.input_ids, dtype=torch.long), torch.tensor(batch.mm_token_type_ids),
            image_grid_thw=torch.tensor(batch.image_grid_thw), attention_mask=torch.tensor(batch.attention_mask))
        pos, delta = qwen3_vl.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg)
        np.testing.assert_array_equal(pos, ref_pos.numpy(), err_msg=name)
        np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0], err_msg=name)
        assert delta.min() < 0  # an image advances positions by max(h, w)/2 < its token count


def test_vision_tower_and_deepstack_match(pair):
    cfg, hf, model = pair
    # Several images, mixed sizes, and a 2-frame entry (t=2: attention stays within each frame).
    batch = testing.make_batch(cfg, [[(1, 4, 6), (1, 8, 4)], [(2, 4, 4)]], [2, 2], seed=5)
    with torch.no_grad():
        out = hf.model.visual(torch.tensor(batch.pixel_values), grid_thw=torch.tensor(batch.image_grid_thw))
    n = batch.pixel_values.shape[0]
    vi = qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg, pad_patches_to=PATCH_ROWS)
    embeds, deepstack = model.encode_images(jnp.asarray(np.pad(batch.pixel_values, ((0, PATCH_ROWS - n), (0, 0)))), vi)
    m = n // cfg.vision.merge_unit
    assert embeds.shape == (PATCH_ROWS // cfg.vision.merge_unit, cfg.text.hidden_size)
    np.testing.assert_allclose(np.asarray(embeds)[:m], out.pooler_output.numpy(), atol=TOL, rtol=0)
    assert len(deepstack) == len(cfg.vision.deepstack_visual_indexes) == len(out.deepstack_features)
    for ours, ref in zip(deepstack, out.deepstack_features):
        np.testing.assert_allclose(np.asarray(ours)[:m], ref.numpy(), atol=TOL, rtol=0)


def test_jit_with_precomputed_inputs_and_image_embeds(tied_pair):
    """Under the caller's jit with host-side position ids / vision inputs, and with precomputed image embeds
    (vision tower run once, reused), the logits equal the convenience path's."""
    cfg, _, model = tied_pair
    batch = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4)]], [4, 2], seed=7, pad_to=SEQ_LEN)
    ref = _ours(model, batch)
    n = batch.pixel_values.shape[0]
    vi = qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg, pad_patches_to=PATCH_ROWS)
    pixels = np.concatenate([batch.pixel_values, np.full((PATCH_ROWS - n, cfg.vision.patch_dim), 7.0, np.float32)])
    pos, _ = qwen3_vl.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg)
    valid = batch.attention_mask.astype(bool)

    @jax.jit
    def from_embeds(ids, mask, pos, pix, vi, deepstack_scale):
        embeds, ds = model.encode_images(pix, vi)
        return model(ids, mask, position_ids=pos, image_embeds=embeds,
                     deepstack_embeds=tuple(d * deepstack_scale for d in ds))

    out = np.asarray(from_embeds(batch.input_ids, batch.attention_mask, pos, pixels, vi, 1.0))
    assert np.abs(out - ref)[valid].max() <= TOL  # jit fuses differently from eager: fp32 rounding only
    # Dropping the deepstack features changes the logits by far more than the tolerance: the tests can fail.
    out0 = np.asarray(from_embeds(batch.input_ids, batch.attention_mask, pos, pixels, vi, 0.0))
    assert np.abs(out0 - ref)[valid].max() > 100 * TOL


def test_hidden_states_times_lm_head_is_logits(tied_pair):
    cfg, _, model = tied_pair
    batch = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4)]], [4, 2], seed=7, pad_to=SEQ_LEN)
    n = batch.pixel_values.shape[0]
    pixels = jnp.asarray(np.pad(batch.pixel_values, ((0, PATCH_ROWS - n), (0, 0))))
    hidden = model.hidden_states(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), pixels,
                                 batch.image_grid_thw)
    w = model.lm_head_kernel()
    assert hidden.shape == batch.input_ids.shape + (cfg.text.hidden_size,)
    assert w.shape == (cfg.text.hidden_size, cfg.text.vocab_size)
    np.testing.assert_allclose(np.asarray(hidden @ w), _ours(model, batch), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(model.language_model.embed_tokens[...]).T)
