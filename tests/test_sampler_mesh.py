"""The sampler on the 8-device simulated CPU mesh (data 2 × fsdp 2 × tensor 2) gives the same tokens as on
one device, with top-p sampling, images and finished rows compacted out per batch shard (tests/conftest.py
provides the 8 devices)."""

import jax
import numpy as np
import pytest
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import sharding, testing
from vaopd_jax.rollout import decode, sampler


def test_same_tokens_on_8_device_mesh_as_on_one_device():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    cfg = testing.tiny_config(text=dict(vocab_size=64, num_hidden_layers=2), image_token_id=60,
                              video_token_id=61, vision_start_token_id=62, vision_end_token_id=63,
                              vision=dict(depth=2, deepstack_visual_indexes=(0,)))
    batch = testing.make_batch(cfg, [[(1, 4, 4)], [], [(1, 4, 8)], []], [3, 7, 2, 5], seed=3)
    # 16 rows: decoded in two stages, the second on each batch shard's unfinished rows (rollout/decode.py).
    kw = dict(max_new_tokens=16, num_samples=4, temperature=0.7, top_p=0.9, eos_token_ids=tuple(range(3, 20)),
              rng=19, valid_vocab_size=60)
    args = (batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)

    single = sampler.generate(qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(0)), *args, **kw)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:8],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = sharding.shard_model(qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(0)), mesh)
    sharded = sampler.generate(model, *args, mesh=mesh, **kw)

    assert decode.row_groups(16, mesh) == 4 and decode.compaction_schedule(16, 4) == (16, 4)
    # The second stage runs: at some step every shard (4 rows) has at most 1 unfinished row, and some row goes on.
    active = np.asarray(single.lengths)[None, :] > np.arange(16)[:, None]  # (step, row)
    second = (active.reshape(16, 4, 4).sum(-1).max(-1) <= 1) & active.any(-1)
    assert second.sum() >= 4 and active[-1].any(), np.asarray(single.lengths)
    # Rows (B*K = 16) are split over data × fsdp = 4 devices.
    assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.response_mask), np.asarray(single.response_mask))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-4)
    assert np.asarray(single.tokens).max() < 60
    # The reported log-probs are those of the processed (temperature 0.7, nucleus) distribution.
    mask = np.asarray(single.response_mask).astype(bool)
    gap = np.abs(np.asarray(single.logprobs) - np.asarray(single.model_logprobs))[mask]
    assert gap.mean() > 0.01 and (np.asarray(single.logprobs)[mask] <= 0).all()
