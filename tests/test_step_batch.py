"""Host-side TrainBatch builder: layout, MRoPE positions, image gather, vision-token truncation, errors."""

import numpy as np
import pytest

from vaopd_jax.data import batch as batch_lib
from vaopd_jax.distill.batch import build_train_batch
from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing

K = 2


@pytest.fixture(scope="module")
def cfg():
    return qwen3_vl.Qwen3VLConfig.tiny()


def _flat(cfg):
    return testing.make_batch(cfg, [[(1, 4, 4)], [(1, 4, 8), (1, 4, 4)]], text_lens=[3, 2], seed=0)


def _prompts(cfg):
    pb = _flat(cfg)
    return batch_lib.from_flat(pb.input_ids, pb.attention_mask, pb.pixel_values, pb.image_grid_thw, cfg,
                               pixel_values_pixelated=-pb.pixel_values)


def test_layout_positions_and_image_rows(cfg):
    prompts = _prompts(cfg)
    tokens = np.arange(1, 1 + 4 * 5, dtype=np.int32).reshape(4, 5)
    lengths = np.array([5, 2, 0, 3])
    mask = np.arange(5)[None] < lengths[:, None]
    batch = build_train_batch(prompts, tokens, mask, K, cfg, seq_len=40)
    prompt_len = prompts.attention_mask.sum(1)
    assert batch.input_ids.shape == (4, 40) and batch.position_ids.shape == (3, 4, 40)
    for r in range(4):
        n, m = prompt_len[r // K], lengths[r]
        np.testing.assert_array_equal(batch.input_ids[r, :n], prompts.input_ids[r // K, :n])
        np.testing.assert_array_equal(batch.input_ids[r, n:n + m], tokens[r, :m])
        assert batch.attention_mask[r].sum() == n + m
        # The hidden state at position n - 1 + j predicts response token j.
        np.testing.assert_array_equal(batch.response_positions[r, :m], n - 1 + np.arange(m))
    # MRoPE positions equal get_rope_index of the concatenated rows (images repeated per rollout).
    flat = _flat(cfg)
    grids = flat.image_grid_thw
    row_grids = np.concatenate([grids[[0]], grids[[0]], grids[1:3], grids[1:3]])
    expected, _ = qwen3_vl.get_rope_index(batch.input_ids, row_grids, batch.attention_mask, cfg)
    valid = batch.attention_mask.astype(bool)
    np.testing.assert_array_equal(batch.position_ids[:, valid], expected[:, valid])
    # Per-prompt pixel blocks padded to a power of two; both views split the same way.
    assert batch.pixel_values.shape == (2, 64, cfg.vision.patch_dim)
    np.testing.assert_array_equal(batch.pixel_values[0, :16], flat.pixel_values[:16])
    np.testing.assert_array_equal(batch.pixel_values[1, :48], flat.pixel_values[16:64])
    np.testing.assert_array_equal(batch.pixel_values[0, 16:], 0.0)
    np.testing.assert_array_equal(batch.pixel_values_pixelated, -batch.pixel_values)
    assert batch.vision_inputs.segment_ids.shape == (2, 64)
    # image_rows: the K rows of prompt p read merged rows p * 16 + [0, n_p), in <|image_pad|> order.
    n_tokens = [4, 12]
    expected_rows = np.concatenate([p * 16 + np.arange(n_tokens[p]) for p in (0, 1) for _ in range(K)])
    assert int((batch.input_ids == cfg.image_token_id).sum()) == len(expected_rows)
    np.testing.assert_array_equal(batch.image_rows[:len(expected_rows)], expected_rows)
    assert batch.image_rows.shape == (4 * 16,)
    assert int(batch.num_truncated) == 0
    np.testing.assert_array_equal(batch.sampler_logprobs, 0.0)


def test_sampled_vision_token_cuts_the_row(cfg):
    prompts = _prompts(cfg)
    tokens = np.full((4, 6), 7, np.int32)
    tokens[1, 2] = cfg.image_token_id
    mask = np.ones((4, 6), bool)
    batch = build_train_batch(prompts, tokens, mask, K, cfg)
    n = prompts.attention_mask[0].sum()
    # The placeholder stays a target; nothing after it is trained and it is never fed as input.
    np.testing.assert_array_equal(batch.response_mask[1], [1, 1, 1, 0, 0, 0])
    assert batch.attention_mask[1].sum() == n + 2
    assert int(batch.num_truncated) == 1
    assert int((batch.input_ids == cfg.image_token_id).sum()) == 2 * 4 + 2 * 12


def test_text_only_prompts(cfg):
    pb = testing.make_batch(cfg, [[], []], text_lens=[4, 2])
    tokens = np.ones((4, 3), np.int32)
    prompts = batch_lib.from_flat(pb.input_ids, pb.attention_mask, None, None, cfg)
    batch = build_train_batch(prompts, tokens, np.ones((4, 3)), K, cfg)
    assert batch.pixel_values is None and batch.image_rows is None
    # Text only: positions are 0, 1, 2, ... through prompt and response.
    np.testing.assert_array_equal(batch.position_ids[0, 2, :5], np.arange(5))


def test_builder_errors_name_the_problem(cfg):
    prompts = _prompts(cfg)
    tokens = np.ones((4, 3), np.int32)
    with pytest.raises(ValueError, match="num_rollouts"):
        build_train_batch(prompts, tokens, np.ones((4, 3)), 3, cfg)
    with pytest.raises(ValueError, match="prefix"):
        build_train_batch(prompts, tokens, np.array([[0, 1, 1]] * 4), K, cfg)
    with pytest.raises(ValueError, match="seq_len"):
        build_train_batch(prompts, tokens, np.ones((4, 3)), K, cfg, seq_len=10)
    flat = _flat(cfg)
    with pytest.raises(ValueError, match="patches_per_prompt"):
        batch_lib.from_flat(flat.input_ids, flat.attention_mask, flat.pixel_values, flat.image_grid_thw, cfg,
                            patches_per_prompt=32)
    with pytest.raises(ValueError, match="pixel_values_pixelated"):
        build_train_batch(prompts._replace(pixel_values_pixelated=None), tokens, np.ones((4, 3)), K, cfg)
    with pytest.raises(TypeError, match="PromptBatch"):
        build_train_batch(prompts._asdict(), tokens, np.ones((4, 3)), K, cfg)
