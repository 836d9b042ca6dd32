"""Hugging Face checkpoints in and out: round trips through transformers, sharded indexes, clear errors."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from references import require

torch = require("torch")
transformers = require("transformers")

from vaopd_jax.models import qwen3_vl  # noqa: E402
from vaopd_jax.models.qwen3_vl import convert, testing  # noqa: E402

SEQ_LEN, PATCH_ROWS = 40, 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny untied transformers checkpoint saved with save_pretrained (single file) and its batch."""
    cfg = testing.tiny_config(vision=dict(deepstack_visual_indexes=(1, 2)))
    hf = testing.hf_reference_model(cfg, seed=2)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    batch = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4)]], [3, 2], seed=4, pad_to=SEQ_LEN)
    return cfg, hf, str(path), batch


def _logits(model, batch):
    pad = PATCH_ROWS - batch.pixel_values.shape[0]
    pixels = jnp.asarray(np.pad(batch.pixel_values, ((0, pad), (0, 0))))
    return np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), pixels,
                            batch.image_grid_thw))


def _valid_max_diff(a, b, batch):
    return np.abs(a - b)[batch.attention_mask.astype(bool)].max()


def test_round_trip_through_transformers(hf_dir, tmp_path):
    cfg, hf, path, batch = hf_dir
    ref = testing.hf_logits(hf, batch)
    model = qwen3_vl.load_hf_checkpoint(path, dtype=jnp.float32)
    assert model.config == cfg
    assert _valid_max_diff(_logits(model, batch), ref, batch) <= 1e-4
    out = tmp_path / "ours"
    qwen3_vl.save_hf_checkpoint(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf2, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf2.eval()
    # Every tensor transformers holds comes back bit-identical (fp32 all the way).
    sd1, sd2 = hf.state_dict(), hf2.state_dict()
    assert sorted(sd1) == sorted(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert _valid_max_diff(testing.hf_logits(hf2, batch), ref, batch) == 0.0

    # The command-line converter (load + save) writes the same tensors, here cast to bf16.
    cli = tmp_path / "cli"
    convert.main([path, str(cli), "--dtype", "bfloat16"])
    src, dst = convert.CheckpointReader(path), convert.CheckpointReader(cli)
    assert sorted(src.where) == sorted(dst.where)
    key = "model.visual.deepstack_merger_list.1.linear_fc2.weight"
    assert dst.get(key).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(dst.get(key), src.get(key).astype(ml_dtypes.bfloat16))


def test_sharded_index_tied_and_bf16(tmp_path):
    """Loader reads transformers' sharded index; tied embeddings (no lm_head.weight); our bf16 sharded save is
    loaded by transformers with bf16 tensors."""
    cfg = testing.tiny_config(tie_word_embeddings=True)
    hf = testing.hf_reference_model(cfg, seed=3)
    src = tmp_path / "src"
    hf.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    model = qwen3_vl.load_hf_checkpoint(src, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.language_model.embed_tokens[...]),
                                  hf.model.language_model.embed_tokens.weight.detach().numpy())
    assert not hasattr(model, "lm_head")
    batch = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4)]], [3, 2], seed=4, pad_to=SEQ_LEN)
    assert _valid_max_diff(_logits(model, batch), testing.hf_logits(hf, batch), batch) <= 1e-4

    dst = tmp_path / "dst"
    qwen3_vl.save_hf_checkpoint(model, dst, dtype=jnp.bfloat16, max_shard_bytes=64 << 10)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((dst / f).exists() for f in files)
    assert "lm_head.weight" not in index["weight_map"]
    hf2, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(dst, dtype=torch.bfloat16,
                                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf2.lm_head.weight.data_ptr() == hf2.model.language_model.embed_tokens.weight.data_ptr()  # tied
    w = hf2.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    assert w.dtype == torch.bfloat16
    ref_w = hf.model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(w.float().numpy(), ref_w.astype(ml_dtypes.bfloat16).astype(np.float32))
    # And our loader reads the bf16 sharded checkpoint back (bf16 params).
    model_bf16 = qwen3_vl.load_hf_checkpoint(dst, dtype=jnp.bfloat16)
    assert model_bf16.language_model.layers.q_kernel[...].dtype == jnp.bfloat16


def _rewrite(path, edit):
    """Rewrites model.safetensors of `path` after edit(dict of numpy tensors)."""
    st = convert.SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    convert._write_safetensors(os.path.join(path, "model.safetensors"), list(tensors.items()))


def test_bad_checkpoints_give_clear_errors(hf_dir, tmp_path):
    cfg, hf, path, _ = hf_dir
    bad = tmp_path / "bad"
    hf.save_pretrained(bad)
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    _rewrite(bad, lambda t: t.pop(key))
    with pytest.raises(convert.CheckpointError, match=r"missing tensor 'model\.language_model\.layers\.1\.mlp"):
        qwen3_vl.load_hf_checkpoint(bad)

    hf.save_pretrained(bad)
    key = "model.visual.blocks.0.attn.qkv.weight"
    _rewrite(bad, lambda t: t.__setitem__(key, t[key][:-3]))
    vh = cfg.vision.hidden_size
    with pytest.raises(convert.CheckpointError,
                       match=rf"{key}'.*shape \({3 * vh - 3}, {vh}\), expected \({3 * vh}, {vh}\)"):
        qwen3_vl.load_hf_checkpoint(bad)

    hf.save_pretrained(bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "qwen2_5_vl"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2_5_vl'"):
        qwen3_vl.load_hf_checkpoint(bad)


def test_config_from_hf_legacy_rope_scaling_and_presets():
    cfg = testing.tiny_config()
    d = cfg.to_hf_dict()
    legacy = json.loads(json.dumps(d))
    rope = legacy["text_config"].pop("rope_parameters")
    legacy["text_config"]["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"],
                                             "mrope_interleaved": True}
    legacy["text_config"]["rope_theta"] = rope["rope_theta"]
    assert qwen3_vl.Qwen3VLConfig.from_hf(legacy) == cfg == qwen3_vl.Qwen3VLConfig.from_hf(d)
    assert hash(cfg) == hash(qwen3_vl.Qwen3VLConfig.from_hf(d))
    c2 = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b()
    assert (c2.text.hidden_size, c2.text.num_hidden_layers, c2.tie_word_embeddings) == (2048, 28, True)
    assert c2.vision.deepstack_visual_indexes == (5, 11, 17)
    c8 = qwen3_vl.Qwen3VLConfig.qwen3_vl_8b()
    assert (c8.vision.depth, c8.vision.out_hidden_size, c8.tie_word_embeddings) == (27, 4096, False)
    # transformers accepts our dict and reproduces the sizes.
    hf_cfg = transformers.Qwen3VLConfig(**qwen3_vl.Qwen3VLConfig.qwen3_vl_32b().to_hf_dict())
    assert hf_cfg.text_config.num_hidden_layers == 64 and hf_cfg.vision_config.out_hidden_size == 5120
    with pytest.raises(ValueError, match=r"mrope_section must be 3 ints summing to head_dim/2=8"):
        testing.tiny_config(text=dict(mrope_section=(24, 20, 20)))
    with pytest.raises(ValueError, match=r"deepstack_visual_indexes entries must be in \[0, depth=3\), got 5"):
        testing.tiny_config(vision=dict(deepstack_visual_indexes=(0, 5)))


def test_checkpoint_tensors_must_match_its_config_missing_and_extra_named_at_once(hf_dir, tmp_path):
    cfg, hf, _, _ = hf_dir
    bad = tmp_path / "extra"
    hf.save_pretrained(bad)
    dropped = "model.language_model.layers.0.self_attn.k_norm.weight"

    def edit(tensors):  # a stray tensor (another model's layer) and a missing one in the same file
        tensors["model.language_model.layers.99.mlp.up_proj.weight"] = tensors["model.language_model.norm.weight"]
        tensors.pop(dropped)

    _rewrite(bad, edit)
    with pytest.raises(convert.CheckpointError) as err:
        qwen3_vl.load_hf_checkpoint(bad)
    message = str(err.value)
    assert f"missing tensor '{dropped}' (1 missing)" in message
    assert "extra tensor 'model.language_model.layers.99.mlp.up_proj.weight' (1 extra, not used by this config)" \
        in message and "its tensors do not match its config.json" in message
    # A config.json of a shallower model than its tensors: every tensor of the dropped layer is extra.
    hf.save_pretrained(bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] -= 1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.CheckpointError,
                       match=r"extra tensor 'model\.language_model\.layers\.\d+\..*extra, not used"):
        qwen3_vl.load_hf_checkpoint(bad)
