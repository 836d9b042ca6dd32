"""sft.py: reply layout of the supervised batch, and a few steps lower the answer loss; the demo warm-ups'
image views; the trainer's vocabulary bound."""

import dataclasses

import numpy as np
import pytest

from vaopd_jax import config as config_lib
from vaopd_jax.models import load as load_lib
from vaopd_jax import sft
from vaopd_jax.data import pipeline, synthetic
from vaopd_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def setup():
    tok = tokenizer_lib.load_tokenizer(None)
    cfg = load_lib.config_from_spec(config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                                                 vision_depth=1, vision_hidden=32))
    pcfg = pipeline.PipelineConfig(batch_size=8, prompt_buckets=(32, 64), prompt_patch_buckets=(16, 32), min_pixels=1024,
                                   max_pixels=4096, shard_index=0, shard_count=1)
    batches = pipeline.make_iterator(synthetic.SyntheticSource(256, seed=1), pcfg, tokenizer=tok, model_config=cfg)
    return tok, cfg, batches


def test_answer_tokens_and_batch_layout(setup):
    tok, cfg, batches = setup
    ids = sft.answer_token_ids(tok, "red")
    assert tok.decode(ids) == "Answer: red<|im_end|>" and ids[-1] == 151645
    prompt = next(batches)
    batch = sft.build_sft_batch(prompt, tok, max_answer_tokens=8)
    for row in range(len(prompt.answer)):
        n = int(prompt.attention_mask[row].sum())
        reply = sft.answer_token_ids(tok, prompt.answer[row])
        k = len(reply)
        np.testing.assert_array_equal(batch["input_ids"][row, n:n + k], reply)
        assert batch["attention_mask"][row].sum() == n + k
        np.testing.assert_array_equal(batch["target_positions"][row, :k], np.arange(n - 1, n - 1 + k))
        np.testing.assert_array_equal(batch["target_ids"][row, :k], reply)
        assert batch["target_mask"][row].sum() == k
        # The prompt part keeps the prompt's MRoPE positions (image block included).
        np.testing.assert_array_equal(batch["position_ids"][:, row, :n], prompt.position_ids[:, row, :n])
    assert batch["position_ids"].shape == (3,) + batch["input_ids"].shape
    # The whole row's positions equal get_rope_index of prompt + reply.
    from vaopd_jax.models import qwen3_vl

    grids = prompt.image_grid_thw.reshape(-1, 3)
    expected, _ = qwen3_vl.get_rope_index(batch["input_ids"], grids[grids.any(-1)], batch["attention_mask"], cfg)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, valid], expected[:, valid])
    with pytest.raises(ValueError, match="needs .* tokens; max_answer_tokens is 2"):
        sft.build_sft_batch(prompt, tok, max_answer_tokens=2)


def test_a_few_steps_lower_the_reply_loss(setup):
    import jax.numpy as jnp
    from flax import nnx

    from vaopd_jax.models import qwen3_vl

    tok, cfg, batches = setup
    model = qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    fixed = [sft.build_sft_batch(next(batches), tok) for _ in range(2)]
    loss_before = float(sft.sft_loss(model, fixed[0])[0])
    model, history = sft.train_sft(model, (fixed[i % 2] for i in range(100)), steps=12, lr=1e-2, log_every=4,
                                   warmup_steps=2)
    assert [h[0] for h in history] == [4, 8, 12]
    loss_after, accuracy = (float(x) for x in sft.sft_loss(model, fixed[0]))
    assert np.isfinite(loss_before) and loss_after < loss_before - 1.0
    assert accuracy > 0.5  # "Answer", ":" and <|im_end|> are learned first


def test_warm_up_views_replace_exactly_the_chosen_images(setup):
    tok, cfg, batches = setup
    batch = next(batches)
    kinds = batch.kind
    assert {"fine", "coarse"} <= set(kinds)  # both kinds in one batch, so the mixed view is exercised
    original, pixelated = batch.pixel_values, batch.pixel_values_pixelated
    assert batch.with_view("original") is batch
    np.testing.assert_array_equal(batch.with_view("pixelated").pixel_values, pixelated)
    mixed = batch.with_view("pixelated_fine").pixel_values
    for b in range(len(kinds)):  # each prompt's own rows, its padding rows included
        want = pixelated if kinds[b] == "fine" else original
        np.testing.assert_array_equal(mixed[b], want[b])
    assert not np.array_equal(mixed, original) and not np.array_equal(mixed, pixelated)
    with pytest.raises(ValueError, match="unknown image view 'blurred'"):
        batch.with_view("blurred")


def test_lm_head_padding_rows_are_left_out_of_sampling_and_the_loss(setup):
    tok, cfg, _ = setup
    # Qwen3-VL's LM head has 151,936 rows for 151,669 tokens: the trainer samples, KLs and VAs over the tokens.
    assert cfg.text.vocab_size == 151936
    assert tokenizer_lib.valid_vocab_size(tok, cfg.text.vocab_size) == len(tok) == 151669
    # A head with fewer rows than the tokenizer has tokens (still holding the image-token ids).
    small = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=151660))
    assert tokenizer_lib.valid_vocab_size(tok, small.text.vocab_size) == 151660
