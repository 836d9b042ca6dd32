"""Micro-batching inside the train step (`StepConfig.micro_batch_rollouts`) gives the unbatched step's loss,
gradients and updated params, on 1 and on 8 simulated devices (tiny random models, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vaopd_jax.data import batch as batch_lib
from vaopd_jax.distill import microbatch
from vaopd_jax.distill import objective
from vaopd_jax.distill import batch as train_batch_lib
from vaopd_jax.distill import state as state_lib
from vaopd_jax.distill import step as step_lib
from vaopd_jax.distill.batch import build_train_batch
from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing
from vaopd_jax.parallel.mesh import make_mesh

FAST_COMPILE = {"xla_backend_optimization_level": 0}
K, P, TR = 2, 4, 6
VALID_VOCAB = 500


@pytest.fixture(scope="module")
def setup():
    teacher_cfg, student_cfg = testing.one_layer_config(48), testing.one_layer_config(32)
    # Four prompts with different images (one with two), so every micro-batch has its own image layout.
    images = [[(1, 4, 4)], [(1, 4, 8), (1, 4, 4)], [(1, 8, 4)], [(1, 4, 4)]]
    pb = testing.make_batch(teacher_cfg, images, text_lens=[3, 2, 4, 1], seed=0)
    rng = np.random.default_rng(1)
    prompts = batch_lib.from_flat(pb.input_ids, pb.attention_mask, pb.pixel_values, pb.image_grid_thw, teacher_cfg,
                                  pixel_values_pixelated=rng.standard_normal(pb.pixel_values.shape).astype(np.float32))
    tokens = rng.integers(0, 400, (P * K, TR)).astype(np.int32)
    lengths = np.array([6, 3, 1, 5, 0, 4, 6, 2])  # one empty rollout: its sibling takes the prompt's weight
    mask = (np.arange(TR)[None] < lengths[:, None]).astype(np.float32)
    batch = build_train_batch(prompts, tokens, mask, K, teacher_cfg)
    teacher_graphdef, teacher_params = state_lib.split_teacher(testing.o1_model(teacher_cfg, 1))
    # Plain SGD with lr 1: new params = params - grads, so comparing params compares the gradients.
    optimizer = optax.sgd(1.0)
    student = testing.o1_model(student_cfg, 2)
    return dict(batch=batch, teacher_graphdef=teacher_graphdef, teacher_params=teacher_params,
                optimizer=optimizer, student=student, results={})


def _run(s, micro_batch_rollouts, method="va_opd", mesh=None):
    key = (micro_batch_rollouts, method, mesh is not None)
    if key in s["results"]:
        return s["results"][key]
    config = step_lib.StepConfig(num_rollouts=K, objective=objective.ObjectiveConfig(method=method), kl_chunk_size=4,
                                 valid_vocab_size=VALID_VOCAB, micro_batch_rollouts=micro_batch_rollouts)
    state = state_lib.create_train_state(s["student"], s["optimizer"], jax.random.key(0), remat="block", mesh=mesh)
    params = jax.tree.map(np.asarray, state.params)
    teacher_params = s["teacher_params"]
    if mesh is not None:
        teacher_params = jax.device_put(teacher_params, qwen3_vl.param_shardings(
            nnx.merge(s["teacher_graphdef"], teacher_params), mesh))
    train_step = step_lib.make_train_step(config, s["teacher_graphdef"], s["optimizer"], mesh=mesh,
                                          state_sharding=state_lib.train_state_sharding(state) if mesh else None,
                                          compiler_options=FAST_COMPILE)
    new_state, metrics = train_step(state, teacher_params, train_batch_lib.shard_batch(s["batch"], mesh), jax.random.key(3))
    grads = jax.tree.map(lambda before, after: before - np.asarray(after), params, new_state.params)
    out = {"metrics": {k: float(v) for k, v in metrics.items()}, "grads": grads}
    s["results"][key] = out
    return out


def _assert_same(got, want, grad_norm_rtol=2e-4):
    """Equal up to fp32 reassociation. With these O(1)-activation tiny models that reaches 4e-4 of a gradient
    leaf's largest entry: as much as the same unbatched step gets from running on a (2, 2, 2) mesh instead of
    one device. The loss and the other metrics agree to ~1e-6."""
    assert got["metrics"]["skipped"] == 0 and want["metrics"]["loss"] > 0.1
    for name, value in want["metrics"].items():
        rtol = grad_norm_rtol if name == "grad_norm" else 1e-5
        np.testing.assert_allclose(got["metrics"][name], value, rtol=rtol, atol=1e-6, err_msg=name)
    flat_got, flat_want = jax.tree.leaves(got["grads"]), jax.tree.leaves(want["grads"])
    assert max(float(np.abs(g).max()) for g in flat_want) > 1e-2  # the gradients are not trivially small
    for g, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-3 * max(float(np.abs(w).max()), 1e-6))


@pytest.mark.parametrize("rollouts_per_micro_batch", [4, 2])  # 2 micro-batches of 2 prompts; 4 of 1 prompt
def test_micro_batches_equal_the_whole_batch(setup, rollouts_per_micro_batch):
    _assert_same(_run(setup, rollouts_per_micro_batch), _run(setup, None))


def test_micro_batched_opd_equals_the_whole_batch(setup):
    _assert_same(_run(setup, 4, method="opd"), _run(setup, None, method="opd"))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: see tests/conftest.py")
def test_micro_batches_on_8_devices_equal_one_device(setup):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)  # micro-batches of 4 rollouts: one per (data, fsdp) device
    _assert_same(_run(setup, 4, mesh=mesh), _run(setup, None), grad_norm_rtol=1e-3)


def test_image_rows_built_in_the_step_match_the_host_batch(setup):
    batch = setup["batch"]
    rows = microbatch.image_rows(jnp.asarray(batch.vision_inputs.merged_valid), K)
    np.testing.assert_array_equal(np.asarray(rows), batch.image_rows)
    split = microbatch.split(jax.tree.map(jnp.asarray, batch), 2, K)
    assert split.input_ids.shape == (2, P * K // 2, batch.input_ids.shape[1])
    assert split.position_ids.shape == (2, 3, P * K // 2, batch.input_ids.shape[1])
    np.testing.assert_array_equal(np.asarray(microbatch.join(split.response_tokens)), batch.response_tokens)


def test_micro_batch_sizes_are_checked():
    assert microbatch.num_micro_batches(64, None, 4) == 1 and microbatch.num_micro_batches(64, 64, 4) == 1
    assert microbatch.num_micro_batches(64, 16, 4) == 4
    with pytest.raises(ValueError, match="multiple of num_rollouts=4"):
        microbatch.num_micro_batches(64, 6, 4)
    with pytest.raises(ValueError, match="divide the batch's 64 rollouts"):
        microbatch.num_micro_batches(64, 24, 4)
    with pytest.raises(ValueError, match="micro_batch_rollouts=3; must be None or a positive multiple"):
        step_lib.StepConfig(num_rollouts=2, micro_batch_rollouts=3)
