"""Mixture-of-experts Qwen3-VL (transformers' Qwen3VLMoeForConditionalGeneration) on tiny fp32 configs: config
bridge and presets, logits parity, the grouped expert matmuls, KV-cache decoding, greedy generation, checkpoints
in and out, and expert parallelism on an 8-device mesh."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from references import require

torch = require("torch")
transformers = require("transformers")

from vaopd_jax.models import qwen3_vl  # noqa: E402
from vaopd_jax.models.qwen3_vl import moe, sharding, testing  # noqa: E402
from vaopd_jax.models.qwen3_vl.convert import CheckpointError, model_from_tensors  # noqa: E402
from vaopd_jax.parallel import make_mesh  # noqa: E402
from vaopd_jax.rollout import sampler  # noqa: E402

TOL = 1e-4
SEQ_LEN = 40
PATCH_ROWS = 128
REAL_30B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
    # text_config of the released Qwen3-VL-30B-A3B-Instruct config.json (legacy rope_scaling form)
    "text_config": {
        "model_type": "qwen3_vl_moe_text", "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 262144, "num_attention_heads": 32,
        "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_experts": 128, "num_experts_per_tok": 8},
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
        "in_channels": 3, "intermediate_size": 4304, "model_type": "qwen3_vl", "num_heads": 16,
        "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2},
}

# Every routing variant the issue names: top-2 renormalised with a dense layer among sparse ones (mlp_only_layers),
# tiled grouped matmuls with several 8-row tiles per expert; top-1 without renormalisation with every other layer
# dense (decoder_sparse_step=2) and small token chunks (the lax.map path with a padded last chunk); top-3 without
# renormalisation through jax.lax.ragged_dot.
CONFIGS = {
    "top2_norm_dense_layer1": dict(text=dict(mlp_only_layers=(1,)), moe_impl="tiled", moe_tile_size=8),
    "top1_raw_step2_chunked": dict(text=dict(num_experts_per_tok=1, norm_topk_prob=False, decoder_sparse_step=2),
                                   moe_chunk_size=16),
    "top3_raw_ragged_dot": dict(text=dict(num_experts_per_tok=3, norm_topk_prob=False), moe_impl="ragged_dot"),
}
IMAGES = [[(1, 4, 6)], [(1, 8, 4), (1, 4, 4)], []]  # several sizes, a text-only row, right padding
TEXT_LENS = [4, 2, 9]

def _pair(name):
    return testing.reference_pair(testing.tiny_moe_config(**CONFIGS[name]))


def _logits(model, batch):
    pv = None
    if batch.pixel_values is not None:
        pad = -batch.pixel_values.shape[0] % PATCH_ROWS
        pv = jnp.asarray(np.pad(batch.pixel_values, ((0, pad), (0, 0))))
    return np.asarray(model(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), pv,
                            batch.image_grid_thw))


# ----------------------------------------------------------------------------- config
def test_from_hf_reads_the_released_30b_config_and_equals_the_preset():
    cfg = qwen3_vl.Qwen3VLConfig.from_hf(REAL_30B)
    t = cfg.text
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.norm_topk_prob) == (128, 8, 768, True)
    assert t.sparse_layers == (True,) * 48 and t.num_key_value_heads == 4
    assert cfg == qwen3_vl.Qwen3VLConfig.qwen3_vl_30b_a3b()
    # transformers reads our config dict and gives it back unchanged.
    hf_cfg = transformers.Qwen3VLMoeConfig(**cfg.to_hf_dict())
    assert hf_cfg.text_config.num_experts == 128 and hf_cfg.text_config.moe_intermediate_size == 768
    assert qwen3_vl.Qwen3VLConfig.from_hf(hf_cfg.to_dict()) == cfg


def _count(cfg):
    """(total, active per token) parameter counts of the abstract model."""
    model = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, jnp.bfloat16, rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    t = cfg.text
    experts = sum(t.sparse_layers) * t.num_experts * 3 * t.hidden_size * t.moe_intermediate_size
    return total, total - experts + experts * t.num_experts_per_tok // t.num_experts


@pytest.mark.parametrize("preset,total,active", [("qwen3_vl_30b_a3b", 31.1e9, 3e9),
                                                 ("qwen3_vl_235b_a22b", 236e9, 22e9)])
def test_moe_presets_have_the_published_sizes(preset, total, active):
    """The model cards' sizes: 31.1B / 236B parameters (safetensors), about 3B / 22B of them active per token."""
    n_total, n_active = _count(getattr(qwen3_vl.Qwen3VLConfig, preset)())
    assert abs(n_total - total) / total < 0.005, n_total
    assert active < n_active < active + 1e9, n_active


def test_moe_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, num_experts=6\], got 7"):
        testing.tiny_moe_config(text=dict(num_experts_per_tok=7))
    with pytest.raises(ValueError, match=r"mlp_only_layers entries must be in \[0, num_hidden_layers=3\), got \[3\]"):
        testing.tiny_moe_config(text=dict(mlp_only_layers=(3,)))
    bad = json.loads(json.dumps(REAL_30B))
    del bad["text_config"]["num_experts"]
    with pytest.raises(ValueError, match=r"text_config.num_experts is missing"):
        qwen3_vl.Qwen3VLConfig.from_hf(bad)
    with pytest.raises(ValueError, match=r"moe_chunk_size must be >= 1"):
        testing.tiny_moe_config(moe_chunk_size=0)
    with pytest.raises(ValueError, match=r"moe_impl must be one of \('auto', 'tiled', 'ragged_dot'\), got 'dense'"):
        testing.tiny_moe_config(moe_impl="dense")


# ----------------------------------------------------------------------------- the grouped expert matmuls
def test_grouped_swiglu_equals_a_per_token_loop_over_local_experts():
    """The sorted ragged_dot path == sum_k w_k SwiGLU_{e_k}(x) restricted to the experts held locally (the expert-
    parallel share), with padding tokens (expert -1) and experts that receive no token."""
    rng = np.random.default_rng(0)
    c, k, e, i, n_local, first = 10, 3, 8, 5, 3, 2
    x = rng.standard_normal((c, e), np.float32)
    experts = rng.integers(0, 7, (c, k)).astype(np.int32)
    experts[-2:] = -1
    weights = rng.random((c, k), np.float32)
    gate, up = (rng.standard_normal((n_local, e, i), np.float32) for _ in range(2))
    down = rng.standard_normal((n_local, i, e), np.float32)
    out = np.asarray(moe.grouped_swiglu(x, experts, weights, gate, up, down, first))
    ref = np.zeros((c, e), np.float32)
    for row in range(c):
        for j in range(k):
            local = experts[row, j] - first
            if 0 <= local < n_local:
                g, u = x[row] @ gate[local], x[row] @ up[local]
                ref[row] += weights[row, j] * ((g / (1 + np.exp(-g))) * u) @ down[local]
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    assert not out[-2:].any()


@pytest.mark.parametrize("tile", [1, 4, 64])
def test_tiled_grouped_swiglu_equals_ragged_dot_values_and_gradients(tile):
    """The tiled grouped GEMM == jax.lax.ragged_dot (the reference semantics): empty experts, a group longer than
    a tile, rows routed to no expert at the end; gradients through the custom VJP included."""
    from vaopd_jax.models.qwen3_vl import grouped

    rng = np.random.default_rng(0)
    m, e, i = 37, 8, 5
    rows = jnp.asarray(rng.standard_normal((m, e)), jnp.float32)
    group_sizes = jnp.array([5, 0, 11, 9], jnp.int32)  # 25 of 37 rows routed
    gate, up = (jnp.asarray(rng.standard_normal((4, e, i)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((4, i, e)), jnp.float32)
    ref = grouped.expert_swiglu(rows, group_sizes, gate, up, down, impl="ragged_dot")
    out = jax.jit(lambda *a: grouped.expert_swiglu(*a, impl="tiled", tile=tile))(rows, group_sizes, gate, up, down)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-5)
    assert not np.asarray(out)[25:].any() and np.abs(np.asarray(out)[:25]).min(axis=1).max() > 0

    def loss(impl):
        return lambda *a: jnp.sum(jnp.sin(grouped.expert_swiglu(a[0], group_sizes, *a[1:], impl=impl, tile=tile)))

    want = jax.grad(loss("ragged_dot"), argnums=(0, 1, 2, 3))(rows, gate, up, down)
    got = jax.jit(jax.grad(loss("tiled"), argnums=(0, 1, 2, 3)))(rows, gate, up, down)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * float(np.abs(w).max()), rtol=0)
    assert not np.asarray(got[1])[1].any()  # the expert with no rows gets no gradient


def test_route_renormalises_only_when_asked():
    h = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 6)), jnp.float32)
    probs = np.asarray(jax.nn.softmax(h @ w, axis=-1))
    for norm in (True, False):
        weights, experts = moe.route(h, w, 2, norm)
        expected_ids = np.argsort(-probs, axis=-1)[:, :2]
        np.testing.assert_array_equal(np.asarray(experts), expected_ids)
        top = np.take_along_axis(probs, expected_ids, axis=-1)
        np.testing.assert_allclose(np.asarray(weights), top / top.sum(-1, keepdims=True) if norm else top, rtol=1e-5)


# ----------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_moe(name):
    cfg, hf, model = _pair(name)
    for images, lens in ((IMAGES, TEXT_LENS), ([[], []], [11, 6])):  # images of several sizes; text only
        batch = testing.make_batch(cfg, images, lens, seed=len(name), pad_to=SEQ_LEN)
        ref = testing.hf_logits(hf, batch)
        out = _logits(model, batch)
        valid = batch.attention_mask.astype(bool)
        assert np.abs(ref).max() > 1.0
        assert np.abs(out - ref)[valid].max() <= TOL, (name, images)


def test_routing_matters_so_the_parity_can_fail():
    """Experts differ and the router chooses among them: sending every token to expert 0 changes the logits."""
    cfg, hf, model = _pair("top2_norm_dense_layer1")
    batch = testing.make_batch(cfg, [[], []], [11, 6], seed=3, pad_to=SEQ_LEN)
    ref = _logits(model, batch)
    layers = model.language_model.layers
    saved = layers.router_kernel[...]
    biased = saved.at[:, :, 0].add(1e3)  # every token's top expert becomes 0
    layers.router_kernel.set_value(biased)
    try:
        out = _logits(model, batch)
    finally:
        layers.router_kernel.set_value(saved)
    valid = batch.attention_mask.astype(bool)
    assert np.abs(out - ref)[valid].max() > 100 * TOL


# ----------------------------------------------------------------------------- KV cache and generation
@nnx.jit
def _prefill(model, ids, mask, pos, pixels, vi, cache):
    embeds, ds = model.encode_images(pixels, vi)
    return model.prefill(ids, mask, pos, image_embeds=embeds, deepstack_embeds=ds, cache=cache, last_only=True)


@nnx.jit
def _decode(model, tok, pos, cache, index):
    return model.decode_step(tok, pos, cache, index)


def test_kv_cache_decoding_equals_the_full_forward_moe():
    """Prefill + decode steps == the full forward on prompt + generated tokens, with dense and sparse layers
    mixed (the decode path scans each run of one kind)."""
    cfg = testing.tiny_moe_config(text=dict(mlp_only_layers=(1,)))
    model = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(3))
    prompt = testing.make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4), (1, 4, 4)]], [5, 2], seed=11)
    b, t = prompt.input_ids.shape
    lens = prompt.attention_mask.sum(1)
    steps = 3
    gen = np.random.default_rng(0).integers(0, 400, size=(b, steps)).astype(np.int32)
    full_ids, full_mask = testing.with_generated(prompt, gen)
    full = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask), jnp.asarray(prompt.pixel_values),
                            prompt.image_grid_thw))
    pos, delta = qwen3_vl.get_rope_index(prompt.input_ids, prompt.image_grid_thw, prompt.attention_mask, cfg)
    vi = qwen3_vl.prepare_vision_inputs(prompt.image_grid_thw, cfg)
    last, cache = _prefill(model, prompt.input_ids, prompt.attention_mask, pos, prompt.pixel_values, vi,
                           model.init_cache(b, t + steps))
    np.testing.assert_allclose(np.asarray(last), full[np.arange(b), lens - 1], atol=TOL, rtol=0)
    for j in range(steps):
        step_pos = np.broadcast_to((lens + j + delta)[None, :, None], (3, b, 1)).astype(np.int32)
        logits, cache = _decode(model, gen[:, j:j + 1], step_pos, cache, t + j)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[np.arange(b), lens + j], atol=TOL, rtol=0)


def test_greedy_sampling_equals_transformers_generate_moe():
    cfg, hf, model = _pair("top2_norm_dense_layer1")
    eos, n_new = (7, 9), 8
    batch = testing.make_batch(cfg, [[], [(1, 4, 4)], [(1, 4, 6), (1, 8, 4)]], [6, 3, 2], seed=1)
    out = sampler.generate(model, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                           max_new_tokens=n_new, temperature=0.0, eos_token_ids=eos)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    pix = 0
    images = iter(batch.image_grid_thw)
    for row in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[row].sum())
        ids = torch.tensor(batch.input_ids[row:row + 1, :n], dtype=torch.long)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        n_img = int((ids == cfg.image_token_id).sum())
        grids = []
        while n_img > 0:
            grids.append(next(images))
            n_img -= int(np.prod(grids[-1])) // cfg.vision.merge_unit
        if grids:
            rows = int(sum(np.prod(g) for g in grids))
            kwargs.update(pixel_values=torch.tensor(batch.pixel_values[pix:pix + rows]),
                          image_grid_thw=torch.tensor(np.array(grids)),
                          mm_token_type_ids=(ids == cfg.image_token_id).to(torch.int32))
            pix += rows
        with torch.no_grad():
            seq = hf.generate(**kwargs, do_sample=False, max_new_tokens=n_new, eos_token_id=list(eos),
                              pad_token_id=eos[0], use_cache=True)
        ref = seq[0, n:].numpy()
        assert lengths[row] == len(ref), (row, lengths[row], ref)
        np.testing.assert_array_equal(tokens[row, :len(ref)], ref, err_msg=f"row {row}")


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_through_transformers_moe(tmp_path):
    """Ours -> save_hf_checkpoint (released expert layout) -> transformers from_pretrained: same logits; and
    transformers' save_pretrained (its own layout) -> load_hf_checkpoint: same logits."""
    cfg, hf, model = _pair("top2_norm_dense_layer1")
    batch = testing.make_batch(cfg, [[], []], [11, 6], seed=5, pad_to=SEQ_LEN)
    ref = testing.hf_logits(hf, batch)
    valid = batch.attention_mask.astype(bool)
    t = cfg.text

    ours_dir = tmp_path / "ours"
    qwen3_vl.save_hf_checkpoint(model, ours_dir)
    from safetensors import safe_open
    with safe_open(str(ours_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [
            t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size]
        assert f.get_slice("model.language_model.layers.2.mlp.experts.down_proj").get_shape() == [
            t.num_experts, t.moe_intermediate_size, t.hidden_size]
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in keys  # the dense layer
    assert "model.language_model.layers.1.mlp.experts.down_proj" not in keys
    reloaded = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(
        str(ours_dir), dtype=torch.float32, attn_implementation="eager").eval()
    assert np.abs(testing.hf_logits(reloaded, batch) - ref)[valid].max() <= TOL

    theirs_dir = tmp_path / "theirs"
    hf.save_pretrained(str(theirs_dir))
    with safe_open(str(theirs_dir / "model.safetensors"), "np") as f:
        assert f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [
            t.num_experts, 2 * t.moe_intermediate_size, t.hidden_size]
    loaded = qwen3_vl.load_hf_checkpoint(theirs_dir)
    assert loaded.config.text == cfg.text
    assert np.abs(_logits(loaded, batch) - ref)[valid].max() <= TOL


def test_checkpoint_errors_name_the_expert_tensor():
    cfg, hf, _ = _pair("top2_norm_dense_layer1")
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    def reader_without(missing):
        def read(key):
            if key == missing or key not in state:
                raise CheckpointError(f"state dict: missing tensor {key!r}")
            return state[key]
        return read

    key = "model.language_model.layers.2.mlp.experts.down_proj"
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.language_model\.layers\.2\.mlp\.experts"):
        model_from_tensors(cfg, reader_without(key))
    more = cfg.replace(text=dataclasses.replace(cfg.text, num_experts=8))
    with pytest.raises(CheckpointError, match=r"router '.*layers\.0\.mlp\.gate\.weight' scores 6 experts .* "
                                              r"num_experts=8"):
        model_from_tensors(more, reader_without(None))
    fused = "model.language_model.layers.2.mlp.experts.gate_up_proj"
    state[fused] = state[fused][:5]
    with pytest.raises(CheckpointError, match=r"'.*layers\.2\.mlp\.experts\.gate_up_proj' holds 5 experts .* "
                                              r"num_experts=6"):
        model_from_tensors(cfg, reader_without(None))


# ----------------------------------------------------------------------------- expert parallelism
def test_expert_parallel_logits_on_8_devices_equal_one_device():
    """Experts split over an 'expert' mesh axis, composed with fsdp and tensor (2 x 2 x 2) and alone (8): the
    logits equal the single-device model's; a batch the mesh cannot split (3 rows) takes the replicated-token
    path. Small token chunks exercise the per-chunk gather / reduce-scatter. (Text prompts: the vision tower and
    the deepstack path are the dense model's, tested on meshes in test_model_sharding.)"""
    cfg = testing.tiny_moe_config(text=dict(num_experts=8, mlp_only_layers=(1,)), moe_chunk_size=32,
                                  moe_tile_size=16)
    hf = testing.hf_reference_model(cfg, seed=2)
    single = testing.model_from_hf(hf, cfg)
    batch = testing.make_batch(cfg, [[]] * 8, [3, 5, 2, 4, 9, 7, 8, 6], seed=6, pad_to=24)
    ref = _logits(single, batch)
    valid = batch.attention_mask.astype(bool)
    assert np.abs(ref - testing.hf_logits(hf, batch))[valid].max() <= TOL
    for shape, gate_spec in ((dict(data=1, fsdp=2, expert=2, tensor=2), P(None, "expert", "fsdp", "tensor")),
                             (dict(data=1, expert=8), P(None, "expert", None, None))):
        mesh = make_mesh(**shape)
        sharded = testing.model_from_hf(hf, cfg, mesh=mesh)
        gate = sharded.language_model.layers.expert_gate_kernel[...]
        assert gate.sharding.spec == gate_spec
        assert gate.addressable_shards[0].data.shape[1] == cfg.text.num_experts // shape["expert"]
        ids, mask = (jax.device_put(a, sharding.batch_sharding(mesh, 2)) for a in
                     (batch.input_ids, batch.attention_mask))
        with jax.set_mesh(mesh):
            out = sharded(ids, mask)
        assert np.abs(np.asarray(out) - ref)[valid].max() <= 1e-5, shape
    # 3 rows on expert=8: the batch stays replicated, each device sums its experts' share over all tokens.
    text = testing.make_batch(cfg, [[], [], []], [7, 4, 9], seed=8, pad_to=24)
    with jax.set_mesh(mesh):
        out = sharded(jnp.asarray(text.input_ids), jnp.asarray(text.attention_mask))
    keep = text.attention_mask.astype(bool)
    assert np.abs(np.asarray(out) - _logits(single, text))[keep].max() <= 1e-5


def test_expert_parallel_gradients_equal_one_device():
    """The tiled grouped GEMM's custom VJP under shard_map (rows sharded over data/fsdp/expert, expert weights over
    expert/fsdp/tensor): parameter gradients on a 2 x 2 x 2 mesh equal the single-device ones (a MoE student)."""
    cfg = testing.tiny_moe_config(text=dict(num_experts=8, num_hidden_layers=2),
                                  vision=dict(deepstack_visual_indexes=(0,)), moe_tile_size=8, remat="block")
    model = qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(4))
    ids = np.random.default_rng(0).integers(0, 400, (8, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), (3, 8, 12))

    def loss(m, ids):
        return jnp.mean(jnp.square(m(ids, jnp.ones_like(ids), position_ids=pos)))

    want = nnx.jit(nnx.grad(loss))(model, ids)
    mesh = make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    sharding.shard_model(model, mesh)
    with jax.set_mesh(mesh):
        got = nnx.jit(nnx.grad(loss))(model, jax.device_put(ids, sharding.batch_sharding(mesh, 2)))
    for name in ("router_kernel", "expert_gate_kernel", "expert_up_kernel", "expert_down_kernel", "q_kernel"):
        w = np.asarray(getattr(want.language_model.layers, name)[...])
        g = np.asarray(getattr(got.language_model.layers, name)[...])
        assert np.abs(w).max() > 0, name
        np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max(), rtol=0, err_msg=name)


# ----------------------------------------------------------------------------- the trainer's and evaluator's loaders
def test_trainer_and_evaluator_load_a_moe_checkpoint_and_sample_on_an_expert_mesh(tmp_path):
    """A qwen3_vl_moe checkpoint through the loaders the runs use: the trainer's teacher loader (models/load.py, with
    the run's attention options) on a data x expert mesh (config.mesh.expert), and the evaluator's loader and local
    mesh (evaluate.py, config.mesh.expert) whose sampler gives the single-device greedy tokens."""
    import ml_collections

    from vaopd_jax import evaluate
    from vaopd_jax.config import ModelConfig
    from vaopd_jax.models import load as load_lib

    cfg, _, model = _pair("top2_norm_dense_layer1")
    path = tmp_path / "moe_teacher"
    qwen3_vl.save_hf_checkpoint(model, path)

    options = ModelConfig(dtype="float32", remat="none", kl_chunk_size=8, attention_impl="chunked",
                          attention_chunk_size=16)
    mesh = make_mesh(data=4, fsdp=1, tensor=1, expert=2)
    teacher = load_lib.load_model(options, str(path), mesh, dtype=jnp.float32)
    assert teacher.config.text == cfg.text and teacher.config.attention_impl == "chunked"
    gate = teacher.language_model.layers.expert_gate_kernel[...]
    assert gate.sharding.spec[1] == "expert" and gate.addressable_shards[0].data.shape[1] == cfg.text.num_experts // 2
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(model.language_model.layers.expert_gate_kernel[...]))

    eval_config = ml_collections.ConfigDict({"model": str(path), "export": "best", "dtype": "float32",
                                             "mesh": {"data": -1, "fsdp": 1, "expert": 2, "tensor": 1}})
    eval_mesh = evaluate.local_mesh(eval_config)
    assert dict(eval_mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
    evaluated = evaluate.load_model(eval_config, mesh=eval_mesh)
    assert evaluated.config.text.is_moe
    batch = testing.make_batch(cfg, [[], [(1, 4, 4)], [(1, 4, 6)], []], [6, 3, 2, 5], seed=1)
    kw = dict(max_new_tokens=6, num_samples=2, temperature=0.0, eos_token_ids=(7, 9))
    args = (batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw)
    want = sampler.generate(model, *args, **kw)
    got = sampler.generate(evaluated, *args, mesh=eval_mesh, **kw)
    assert len(got.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    eval_config.mesh.expert = 3
    with pytest.raises(evaluate.EvalConfigError, match=r"fsdp=1 x expert=3 x tensor=1 does not divide the 8 local"):
        evaluate.local_mesh(eval_config)
