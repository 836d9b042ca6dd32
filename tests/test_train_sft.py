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
    cfg = config_lib.model_config_from_spec(config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                                                 vision_depth=1, vision_hidden=32))
    pcfg = pipeline.PipelineConfig(batch_size=8, prompt_buckets=(32, 64), prompt_patch_buckets=(16, 32), min_pixels=1024,
                                   max_pixels=4096, shard_index=0, shard_count=1)
    batches = pipeline.make_iterator(synthetic.SyntheticSource(256, seed=1), pcfg, tokenizer=tok, model_config=cfg)
    return tok, cfg, batches


def test_answer_tokens_and_batch_layout(setup):
    tok, cfg, batches = setup
    ids = sft.answer_token_ids(tok, "red")
    assert tok.decode(ids) == "Answer: red<|im_end|>" and ids[-1] == 151645
    assert sft.reply_token_ids(tok, "", "red") == ids  # a record without a taught reply learns the answer line
    prompt = next(batches)
    image_words = synthetic.image_word_ids(tok)
    batch = sft.build_sft_batch(prompt, tok, max_answer_tokens=64, critical_token_ids=image_words,
                                critical_weight=10.0)
    for row in range(len(prompt.answer)):
        n = int(prompt.attention_mask[row].sum())
        reply = sft.reply_token_ids(tok, prompt.reply[row], prompt.answer[row])
        assert tok.decode(reply) == prompt.reply[row] + "<|im_end|>"  # the synthetic task's taught reply
        k = len(reply)
        assert 24 <= k <= 56
        np.testing.assert_array_equal(batch["input_ids"][row, n:n + k], reply)
        assert batch["attention_mask"][row].sum() == n + k
        np.testing.assert_array_equal(batch["target_positions"][row, :k], np.arange(n - 1, n - 1 + k))
        np.testing.assert_array_equal(batch["target_ids"][row, :k], reply)
        # the words that depend on the image weigh 10, the others 1
        weights = np.where(np.isin(reply, image_words), 10.0, 1.0)
        np.testing.assert_array_equal(batch["target_mask"][row, :k], weights)
        assert batch["target_mask"][row, k:].sum() == 0 and weights.max() == 10.0
        # The prompt part keeps the prompt's MRoPE positions (image block included).
        np.testing.assert_array_equal(batch["position_ids"][:, row, :n], prompt.position_ids[:, row, :n])
    assert batch["position_ids"].shape == (3,) + batch["input_ids"].shape
    # The whole row's positions equal get_rope_index of prompt + reply.
    from vaopd_jax.models import qwen3_vl

    grids = prompt.image_grid_thw.reshape(-1, 3)
    expected, _ = qwen3_vl.get_rope_index(batch["input_ids"], grids[grids.any(-1)], batch["attention_mask"], cfg)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, valid], expected[:, valid])
    with pytest.raises(ValueError, match="needs .* tokens; max_answer_tokens is 20"):
        sft.build_sft_batch(prompt, tok, max_answer_tokens=20)


def test_a_few_steps_lower_the_reply_loss(setup):
    import jax.numpy as jnp
    from flax import nnx

    from vaopd_jax.models import qwen3_vl

    tok, cfg, batches = setup
    model = qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    fixed = [sft.build_sft_batch(next(batches), tok, 64) for _ in range(2)]
    loss_before, accuracy_before = (float(x) for x in sft.sft_loss(model, fixed[0]))
    model, history = sft.train_sft(model, (fixed[i % 2] for i in range(100)), steps=12, lr=1e-2, log_every=4,
                                   warmup_steps=2)
    assert [h[0] for h in history] == [4, 8, 12]
    loss_after, accuracy = (float(x) for x in sft.sft_loss(model, fixed[0]))
    assert np.isfinite(loss_before) and loss_after < loss_before - 1.0
    assert accuracy > accuracy_before + 0.05  # the replies' fixed words ("the", "background", ":") come first


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


def test_task_vocabulary_tokenizer_and_model(setup, tmp_path):
    import jax.numpy as jnp

    from vaopd_jax.data import processor

    base, _, _ = setup
    tok = synthetic.task_tokenizer(base)
    assert 100 <= len(tok) <= 300  # the task's prompts and replies (both reply styles, the auxiliary question) use ~240 of Qwen's 151,669 tokens
    source = synthetic.SyntheticSource(300, seed=8)
    for i in range(len(source)):  # every reply and prompt is in the vocabulary and decodes back exactly
        rec = source[i]
        ids = tok.encode(rec["reply"])
        assert tok.decode(ids) == rec["reply"] and max(ids) < len(tok)
        assert tok.to_base(ids) == base.encode(rec["reply"], add_special_tokens=False)
    prompt, _ = processor.build_prompt(tok, rec["question"], [(1, 4, 4)])
    base_prompt, _ = processor.build_prompt(base, rec["question"], [(1, 4, 4)])
    assert tok.to_base(prompt) == list(base_prompt)
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.to_task([tokenizer_lib.IM_END_ID])[0]
    assert tokenizer_lib.end_token_ids(base) == tokenizer_lib.END_TOKEN_IDS
    assert tok.to_base(tokenizer_lib.end_token_ids(tok)) == list(tokenizer_lib.END_TOKEN_IDS)
    with pytest.raises(ValueError, match="outside the task vocabulary"):
        tok.encode("The zebra is purple.")
    with pytest.raises(ValueError, match=r"must lie in \[0, "):
        tok.decode([len(tok)])
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer_lib.TaskVocabTokenizer(base, [1, 2, 3])
    # saved next to a model, it loads back as the same task vocabulary
    tok.save_pretrained(tmp_path)
    again = tokenizer_lib.load_tokenizer(tmp_path)
    assert isinstance(again, tokenizer_lib.TaskVocabTokenizer) and list(again.base_ids) == list(tok.base_ids)
    # a tiny model of the task vocabulary: its vocabulary and special ids are the compact ones
    spec = config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vision_depth=1, vision_hidden=32)
    run = config_lib.ModelConfig(dtype="float32", remat="none", kl_chunk_size=8, attention_impl="xla",
                                 attention_chunk_size=16)
    spec = config_lib.model_config_from_spec(spec)
    model = load_lib.tiny_model(run, spec, tokenizer=tok)
    assert model.config.text.vocab_size == len(tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.lm_head_kernel().shape == (32, len(tok)) and model.lm_head_kernel().dtype == jnp.float32
    assert load_lib.tiny_model(run, spec, tokenizer=base).config.text.vocab_size == 151936


def test_warm_up_can_keep_the_vision_tower_and_start_it_from_the_teachers(setup, tmp_path):
    import jax
    import types

    import jax.numpy as jnp
    from flax import nnx

    from vaopd_jax.models import qwen3_vl
    from vaopd_jax.parallel import mesh as mesh_lib

    tok, cfg, batches = setup
    leaves = lambda m, part: [np.asarray(x) for x in jax.tree.leaves(nnx.state(getattr(m, part), nnx.Param))]  # noqa
    model = qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    vision, text = leaves(model, "visual"), leaves(model, "language_model")
    fixed = [sft.build_sft_batch(next(batches), tok, 64) for _ in range(2)]
    model, _ = sft.train_sft(model, (fixed[i % 2] for i in range(10)), steps=3, lr=1e-2, warmup_steps=1,
                             train_vision=False)
    assert all(np.array_equal(a, b) for a, b in zip(vision, leaves(model, "visual")))
    assert not all(np.array_equal(a, b) for a, b in zip(text, leaves(model, "language_model")))
    # student.sft.vision_init = 'teacher': the finished SFT teacher's vision tower, copied in place
    options = config_lib.ModelConfig(dtype="float32", remat="none", kl_chunk_size=8, attention_impl="xla",
                                     attention_chunk_size=16)
    run = types.SimpleNamespace(model=options, workdir=str(tmp_path),
                                teacher=types.SimpleNamespace(sft=types.SimpleNamespace(output_dir="")))
    student = qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(5))
    mesh = mesh_lib.make_mesh(-1, 1, 1)
    with pytest.raises(ValueError, match="needs the finished SFT teacher"):
        sft.copy_teacher_vision(student, run, mesh)
    qwen3_vl.save_hf_checkpoint(model, tmp_path / "teacher_sft")
    (tmp_path / "teacher_sft" / sft.SFT_DONE).write_text("ok\n")
    sft.copy_teacher_vision(student, run, mesh)
    assert all(np.allclose(a, b) for a, b in zip(leaves(student, "visual"), leaves(model, "visual")))
    other = config_lib.model_config_from_spec(config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64,
                                                           vision_depth=1, vision_hidden=16))
    with pytest.raises(ValueError, match="shaped like the teacher's"):
        sft.copy_teacher_vision(qwen3_vl.Qwen3VL(other, param_dtype=jnp.float32, rngs=nnx.Rngs(1)), run, mesh)


def test_warm_up_views_pixelate_a_random_share_of_the_prompts(setup):
    _, _, batches = setup
    batch = next(batches)
    assert sft.warmup_views("original")(batch) is batch
    assert np.array_equal(sft.warmup_views("original", 1.0)(batch).pixel_values, batch.pixel_values_pixelated)
    views = sft.warmup_views("original", 0.5, seed=3)
    shown = [views(batch).pixel_values for _ in range(6)]
    pixelated = [[np.array_equal(s[b], batch.pixel_values_pixelated[b]) for b in range(batch.num_prompts)]
                 for s in shown]
    for s, rows in zip(shown, pixelated):  # each prompt is one view or the other, whole
        for b, pix in enumerate(rows):
            assert pix or np.array_equal(s[b], batch.pixel_values[b])
    share = np.mean(pixelated)
    assert 0.3 <= share <= 0.7 and len({tuple(r) for r in pixelated}) > 1  # new draws on every call
    again = sft.warmup_views("original", 0.5, seed=3)
    assert np.array_equal(again(batch).pixel_values, shown[0])  # the draws depend on the seed and call count
    with pytest.raises(ValueError, match="pixelated_share = 1.5"):
        sft.warmup_views("original", 1.5)
