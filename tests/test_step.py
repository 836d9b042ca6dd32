"""The fused train step on tiny random Qwen3-VL student/teacher models (CPU).

Compile cost dominates here, so the compiled steps are module-scoped and built with
XLA's backend optimization level 0 (about half the CPU compile time).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.oracles import reference_opd_loss
from vaopd_jax.data import batch as batch_lib
from vaopd_jax.distill import objective
from vaopd_jax.distill import batch as train_batch_lib
from vaopd_jax.distill import state as state_lib
from vaopd_jax.distill import step as step_lib
from vaopd_jax.distill.batch import build_train_batch
from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing
from vaopd_jax.parallel.mesh import make_mesh

FAST_COMPILE = {"xla_backend_optimization_level": 0}
K, TR = 2, 6
VALID_VOCAB = 500  # the tiny vocabulary is 512; rows 500.. are padding (special ids 500-503 are inputs only)


def _flat_prompts(cfg, seed=0):
    """The prompts in the model's flat layout: (batch, pixelated pixel rows)."""
    pb = testing.make_batch(cfg, [[(1, 4, 4)], [(1, 4, 8), (1, 4, 4)]], text_lens=[3, 2], seed=seed)
    return pb, np.random.default_rng(seed + 1).standard_normal(pb.pixel_values.shape).astype(np.float32)


def _prompt_batch(cfg, seed=0):
    pb, pix = _flat_prompts(cfg, seed)
    return batch_lib.from_flat(pb.input_ids, pb.attention_mask, pb.pixel_values, pb.image_grid_thw, cfg,
                               pixel_values_pixelated=pix)


def _rollouts(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 400, (2 * K, TR)).astype(np.int32)
    lengths = np.array([6, 3, 1, 5])
    return tokens, (np.arange(TR)[None] < lengths[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def setup():
    teacher_cfg, student_cfg = testing.one_layer_config(48), testing.one_layer_config(32)
    teacher, student = testing.o1_model(teacher_cfg, 1), testing.o1_model(student_cfg, 2)
    prompts = _prompt_batch(teacher_cfg)
    tokens, mask = _rollouts()
    batch = build_train_batch(prompts, tokens, mask, K, teacher_cfg)
    # Plain SGD (after the global-norm clip): the update is linear in the gradient, so the 1- vs 8-device
    # comparison is not amplified by Adam's first-step g / |g| on near-zero gradient entries.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
    config = step_lib.StepConfig(num_rollouts=K, kl_chunk_size=4, valid_vocab_size=VALID_VOCAB)
    teacher_graphdef, teacher_params = state_lib.split_teacher(teacher)
    train_step = step_lib.make_train_step(config, teacher_graphdef, optimizer, compiler_options=FAST_COMPILE)
    return dict(teacher=teacher, student=student, prompts=prompts, tokens=tokens, mask=mask, batch=batch,
                optimizer=optimizer, config=config, teacher_graphdef=teacher_graphdef,
                teacher_params=teacher_params, train_step=train_step, cfg=teacher_cfg)


def _fresh_state(s, remat="block"):
    return state_lib.create_train_state(s["student"], s["optimizer"], jax.random.key(0), remat=remat)


def _reference_loss(student_params, s, method="va_opd"):
    """The objective from full-vocabulary logits of the models' own forward (images repeated per rollout)."""
    batch = s["batch"]
    flat, flat_pix = _flat_prompts(s["cfg"])
    grids = flat.image_grid_thw
    per_prompt_rows = [(0, 16), (16, 64)]
    pixels = np.concatenate([flat.pixel_values[a:b] for p, (a, b) in enumerate(per_prompt_rows)
                             for _ in range(K)])
    pixels_pix = np.concatenate([flat_pix[a:b] for p, (a, b) in enumerate(per_prompt_rows) for _ in range(K)])
    grid_rows = np.concatenate([grids[[0]]] * K + [grids[1:3]] * K)
    vision = qwen3_vl.prepare_vision_inputs(grid_rows, s["cfg"])
    student = nnx.merge(nnx.split(s["student"], nnx.Param)[0], student_params)
    teacher = s["teacher"]
    pos = batch.response_positions[..., None]
    take = lambda logits: jnp.take_along_axis(logits, pos, axis=1)
    kw = dict(position_ids=jnp.asarray(batch.position_ids), vision_inputs=vision)
    ids, am = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
    z_s = take(student(ids, am, jnp.asarray(pixels), **kw))
    z_t = take(teacher(ids, am, jnp.asarray(pixels), **kw))
    z_p = take(teacher(ids, am, jnp.asarray(pixels_pix), **kw))
    kl = objective.reverse_kl(z_s, z_t, valid_vocab_size=VALID_VOCAB)
    pick = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z[..., :VALID_VOCAB]),
                                         batch.response_tokens[..., None], -1)[..., 0]
    mask = jnp.asarray(batch.response_mask)
    va = objective.visual_advantage(pick(z_t), pick(z_p), mask)
    if method == "opd":
        return reference_opd_loss(kl, mask)
    return objective.va_opd_loss(kl, va, mask, K)


def test_step_matches_full_logit_reference(setup):
    s = setup
    state = _fresh_state(s)
    params_before = jax.tree.map(np.asarray, state.params)
    new_state, metrics = s["train_step"](state, s["teacher_params"], train_batch_lib.shard_batch(s["batch"]),
                                         jax.random.key(7))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: _reference_loss(p, s)),
                                  compiler_options=FAST_COMPILE)(jax.tree.map(jnp.asarray, params_before))
    assert float(metrics["skipped"]) == 0.0
    assert float(metrics["loss"]) > 0.05  # a meaningful KL, not a near-zero one
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax_global_norm(ref_grads)), rtol=1e-4)
    # Metrics are consistent with the batch.
    assert float(metrics["num_tokens"]) == s["mask"].sum() == 15
    assert float(metrics["num_high_tokens"]) == 2 + 1 + 1 + 1  # max(1, ceil(0.2 * [6, 3, 1, 5]))
    assert float(metrics["num_prompts"]) == 2
    assert 0.0 < float(metrics["weight_min"]) <= 0.5 <= float(metrics["weight_max"]) < 1.0
    assert 0.0 <= float(metrics["va_high_share"]) <= 1.0
    assert int(new_state.step) == 1
    # The state was donated and the params moved.
    assert any(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(new_state.params),
                                                                  jax.tree.leaves(params_before)))


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def test_state_is_donated(setup):
    s = setup
    state = _fresh_state(s)
    leaf = jax.tree.leaves(state.params)[0]
    s["train_step"](state, s["teacher_params"], train_batch_lib.shard_batch(s["batch"]), jax.random.key(0))
    assert leaf.is_deleted()


def test_few_va_opd_steps_lower_kl(setup):
    s = setup
    state = _fresh_state(s)
    batch = train_batch_lib.shard_batch(s["batch"])
    kls = []
    for _ in range(5):
        state, metrics = s["train_step"](state, s["teacher_params"], batch, jax.random.key(0))
        kls.append(float(metrics["kl"]))
    assert all(b < a for a, b in zip(kls, kls[1:])) and kls[-1] < 0.92 * kls[0], kls


def test_non_finite_batch_skips_update(setup):
    s = setup
    state = _fresh_state(s)
    params_before = jax.tree.map(np.asarray, state.params)
    opt_before = jax.tree.map(np.asarray, state.opt_state)
    bad = s["batch"]._replace(pixel_values=s["batch"].pixel_values.copy())
    bad.pixel_values[0, 0, 0] = np.nan
    new_state, metrics = s["train_step"](state, s["teacher_params"], train_batch_lib.shard_batch(bad), jax.random.key(0))
    assert float(metrics["skipped"]) == 1.0
    assert not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(opt_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(new_state.step) == 1


def test_opd_text_only_steps_lower_kl(setup):
    s = setup
    cfg = s["cfg"]
    pb = testing.make_batch(cfg, [[], []], text_lens=[5, 3], seed=3)
    tokens, mask = _rollouts(1)
    prompts = batch_lib.from_flat(pb.input_ids, pb.attention_mask, None, None, cfg)
    batch = train_batch_lib.shard_batch(build_train_batch(prompts, tokens, mask, K, cfg))
    config = step_lib.StepConfig(num_rollouts=K, objective=objective.ObjectiveConfig(method="opd"), kl_chunk_size=5,
                                 valid_vocab_size=VALID_VOCAB)
    train_step = step_lib.make_train_step(config, s["teacher_graphdef"], s["optimizer"],
                                          compiler_options=FAST_COMPILE)
    state = _fresh_state(s, remat="none")
    kls = []
    for _ in range(5):
        state, metrics = train_step(state, s["teacher_params"], batch, jax.random.key(0))
        kls.append(float(metrics["kl"]))
    assert all(b < a for a, b in zip(kls, kls[1:])) and kls[-1] < 0.92 * kls[0], kls
    assert float(metrics["va_mean"]) == 0.0 and float(metrics["num_high_tokens"]) == 0.0
    # OPD's loss is the mean over rollouts of the token-mean KL: with one step's KL it equals kl averaged per row.


def _moe_teacher(seed=3):
    """A tiny mixture-of-experts teacher (4 experts, top-2, renormalised, a dense layer after a sparse one) of the
    setup's vocabulary and vision tower: the dense students learn from it like from a dense teacher."""
    cfg = testing.one_layer_config(48)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=16, mlp_only_layers=(1,)),
                      moe_impl="tiled", moe_tile_size=4)
    return testing.o1_model(cfg, seed)


def test_moe_teacher_steps_lower_kl(setup):
    s = setup
    teacher = _moe_teacher()
    assert teacher.config.text.sparse_layers == (True, False)
    teacher_graphdef, teacher_params = state_lib.split_teacher(teacher)
    train_step = step_lib.make_train_step(s["config"], teacher_graphdef, s["optimizer"], compiler_options=FAST_COMPILE)
    state = _fresh_state(s)
    batch = train_batch_lib.shard_batch(s["batch"])
    kls, losses = [], []
    for _ in range(5):
        state, metrics = train_step(state, teacher_params, batch, jax.random.key(0))
        kls.append(float(metrics["kl"]))
        losses.append(float(metrics["loss"]))
        assert float(metrics["skipped"]) == 0.0
    assert all(b < a for a, b in zip(kls, kls[1:])) and kls[-1] < 0.92 * kls[0], kls
    # The MoE teacher's routed experts count: its step is not the dense setup teacher's step.
    _, dense_metrics = s["train_step"](_fresh_state(s), s["teacher_params"], batch, jax.random.key(0))
    assert abs(float(dense_metrics["loss"]) - losses[0]) > 1e-3 * losses[0]


def test_eight_devices_match_one_device(setup):
    s = setup
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state1 = _fresh_state(s)
    new1, metrics1 = s["train_step"](state1, s["teacher_params"], train_batch_lib.shard_batch(s["batch"]),
                                     jax.random.key(0))
    state8 = state_lib.create_train_state(s["student"], s["optimizer"], jax.random.key(0), remat="block", mesh=mesh)
    teacher_graphdef, teacher_params8 = state_lib.split_teacher(s["teacher"], mesh=mesh)
    assert len(jax.tree.leaves(state8.params)[0].sharding.device_set) == 8
    sharding8 = state_lib.train_state_sharding(state8)
    train_step8 = step_lib.make_train_step(s["config"], teacher_graphdef, s["optimizer"], mesh=mesh,
                                           state_sharding=sharding8,
                                           compiler_options=FAST_COMPILE)
    batch8 = train_batch_lib.shard_batch(s["batch"], mesh)
    assert batch8.input_ids.sharding.spec[0] == ("data", "fsdp")
    new8, metrics8 = train_step8(state8, teacher_params8, batch8, jax.random.key(0))
    np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=1e-5)
    # fp32 sums in another order (vocab split over 'tensor', rows over 'data' x 'fsdp').
    np.testing.assert_allclose(float(metrics8["grad_norm"]), float(metrics1["grad_norm"]), rtol=1e-3)
    for a, b in zip(jax.tree.leaves(new8.params), jax.tree.leaves(new1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    # The new state keeps the input layout (so donation reuses the buffers on the next step).
    for leaf, sharding in zip(jax.tree.leaves(new8), jax.tree.leaves(sharding8)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_the_releases_655_step_schedule(monkeypatch):
    """Geometry3K: 2,101 prompts // 16 = 131 full batches per epoch (drop_last) x 5 epochs = 655 updates; warm-up
    int(0.05 x 655) = 32; then the release's LambdaLR (EasyR1 get_cosine_schedule_with_warmup, min_lr_ratio 0),
    evaluated at the update index as optax does, for every one of the 655 updates."""
    import math
    import os

    from vaopd_jax import config as config_lib
    from vaopd_jax.data import splits

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load_sibling(os.path.join(repo, "configs", "base.py"), "base").get_config()
    monkeypatch.setattr(splits, "data_source", lambda cfg, split: range(2101))
    assert splits.epoch_steps(2101, 16) == 131
    assert splits.train_steps(config) == 655
    assert splits.epoch_steps(38870, 16) * 5 == 12145  # ViRL39K
    config.train.num_steps = 40
    assert splits.train_steps(config) == 40  # an explicit count wins
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        splits.epoch_steps(15, 16)

    lr, total, warmup = 1e-6, 655, int(0.05 * 655)
    assert warmup == 32

    def release_lr(update):  # lr_lambda(current_step) of the release's scheduler, times the peak lr
        if update < warmup:
            return lr * update / max(1, warmup)
        progress = (update - warmup) / max(1, total - warmup)
        return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    schedule = state_lib.make_schedule(lr, total_steps=total, warmup_fraction=0.05)
    ours = np.asarray([float(schedule(s)) for s in range(total)])
    # float32 schedule: 1 + cos cancels near the end, so absolute error ~1e-7 of the peak there
    np.testing.assert_allclose(ours, [release_lr(s) for s in range(total)], rtol=1e-5, atol=1e-7 * lr)
    assert ours[31] < lr and ours[32] == pytest.approx(lr)  # 32 warm-up updates (round() would give 33)


def test_step_config_and_optimizer_validation():
    with pytest.raises(ValueError, match="num_rollouts"):
        step_lib.StepConfig(num_rollouts=0)
    with pytest.raises(ValueError, match="kl_chunk_size"):
        step_lib.StepConfig(kl_chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        step_lib.StepConfig(objective=objective.ObjectiveConfig(method="ppo"))
    with pytest.raises(TypeError, match="ObjectiveConfig"):
        step_lib.StepConfig(objective="opd")
    with pytest.raises(ValueError, match="warmup_fraction"):
        state_lib.make_optimizer(total_steps=10, warmup_fraction=1.0)
    schedule = state_lib.make_schedule(1e-6, total_steps=100, warmup_fraction=0.05)
    np.testing.assert_allclose([float(schedule(i)) for i in (0, 5, 100)], [0.0, 1e-6, 0.0], atol=1e-12)
    # Cosine decay over steps [5, 100] after the linear warm-up.
    np.testing.assert_allclose(float(schedule(52)), 0.5e-6 * (1 + np.cos(np.pi * 47 / 95)), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(2)), 0.4e-6, rtol=1e-5)
