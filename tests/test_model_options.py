"""Model options: remat policy (same values and gradients), bf16 parameters / compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing


def _loss(model, ids, mask):
    hidden = model.hidden_states(ids, mask, position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), (3,) + ids.shape))
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))


def test_remat_block_gives_same_loss_and_grads():
    cfg = testing.tiny_config(text=dict(num_hidden_layers=2), vision=dict(deepstack_visual_indexes=(1,)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 400, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 9:].set(0)
    results = []
    for remat in ("none", "block"):
        model = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(0), remat=remat)
        assert model.config.remat == remat
        loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, ids, mask)
        results.append((float(loss), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    g0 = jax.tree.leaves(results[0][1])
    g1 = jax.tree.leaves(results[1][1])
    assert len(g0) == len(g1) > 30
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="remat must be one of"):
        testing.tiny_config(remat="everything")


def test_bf16_params_and_compute_close_to_fp32():
    cfg = testing.tiny_config()
    fp32 = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(1))
    bf16 = qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert bf16.language_model.layers.q_kernel[...].dtype == jnp.bfloat16
    batch = testing.make_batch(cfg, [[], []], [12, 7], seed=2)  # text only: the vision path is covered in fp32
    args = (jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))
    ref = np.asarray(fp32(*args))
    out = bf16(*args)
    assert out.dtype == jnp.float32  # logits are always fp32
    assert bf16.language_model.embed(args[0]).dtype == jnp.bfloat16  # activations in the compute dtype
    # Same seed -> same weights up to bf16 rounding; bf16 matmuls keep logits within a few percent of their range.
    err = np.abs(np.asarray(out) - ref)[batch.attention_mask.astype(bool)].max()
    assert 0 < err < 0.05 * np.abs(ref).max()


def test_host_side_inputs_validate_and_pad():
    cfg = testing.tiny_config()
    batch = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4)]], [3, 2], seed=0)
    with pytest.raises(ValueError, match=r"image 0 has 6 <\|image_pad\|> tokens but image_grid_thw \(1, 4, 4\) needs"):
        qwen3_vl.get_rope_index(batch.input_ids, [[1, 4, 4], [1, 8, 4]], batch.attention_mask, cfg)
    with pytest.raises(ValueError, match=r"image_grid_thw has 3 rows but the prompts hold 2 images"):
        qwen3_vl.get_rope_index(batch.input_ids, [[1, 4, 6], [1, 8, 4], [1, 4, 4]], batch.attention_mask, cfg)
    vi = qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg, pad_patches_to=64)
    assert vi.valid.sum() == 56 and vi.merged_valid.sum() == 14 and vi.merged_valid.shape == (16,)
    assert (vi.segment_ids[:24] == 0).all() and (vi.segment_ids[24:56] == 1).all() and (vi.segment_ids[56:] == -1).all()
    np.testing.assert_allclose(vi.interp_weights[:56].sum(1), 1.0, rtol=1e-6)  # bilinear weights sum to 1
    assert (vi.interp_weights[56:] == 0).all()
    with pytest.raises(ValueError, match=r"pad_patches_to=58 must be >= the real patch count 56 and a multiple of"):
        qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg, pad_patches_to=58)
