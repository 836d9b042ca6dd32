"""Orbax checkpoints: state + grain iterator round trip, keep policy, corrupt steps, best by accuracy."""

import glob
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vaopd_jax import checkpoint as ckpt_lib


def make_state(scale=1.0, step=0):
    mesh = jax.make_mesh((8,), ("fsdp",))
    w = jax.device_put(scale * jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("fsdp")))
    return {"params": {"w": w, "b": jnp.full((3,), scale)}, "opt": {"mu": jnp.zeros((16, 4))},
            "step": jnp.int32(step), "rng": jax.random.key(int(scale))}


def make_iterator():
    ds = grain.MapDataset.range(1000).seed(0).shuffle().batch(4).to_iter_dataset()
    return iter(ds)


def assert_state_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_iterator_and_meta(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=2, save_every=2)
    state = make_state(2.0, step=4)
    it = make_iterator()
    for _ in range(3):
        next(it)
    assert not manager.save(3, state, data_iterator=it)  # not due: 3 % 2 != 0
    assert manager.save(4, state, data_iterator=it, meta={"nonfinite_streak": 1})
    expected_next = [next(it) for _ in range(2)]
    manager.wait()

    fresh = ckpt_lib.CheckpointManager(str(tmp_path), keep=2, save_every=2)
    it2 = make_iterator()
    restored = fresh.restore_latest(ckpt_lib.abstract_like(make_state()), data_iterator=it2)
    assert restored.step == 4 and restored.meta == {"nonfinite_streak": 1}
    assert_state_equal(restored.state, state)
    assert restored.state["params"]["w"].sharding == state["params"]["w"].sharding
    np.testing.assert_array_equal(next(it2), expected_next[0])
    np.testing.assert_array_equal(next(it2), expected_next[1])


def test_keep_policy_and_empty_dir(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=2, save_every=1, async_save=False)
    assert manager.restore_latest(ckpt_lib.abstract_like(make_state())) is None
    for step in (1, 2, 3):
        manager.save(step, make_state(float(step), step))
    manager.wait()
    assert manager.all_steps() == [2, 3]


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_state"])
def test_corrupt_latest_step_is_skipped_with_warning(tmp_path, caplog, damage):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    manager.save(1, make_state(1.0, 1))
    manager.save(2, make_state(2.0, 2))
    manager.close()
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    if damage == "truncate_arrays":
        files = [f for f in glob.glob(str(state_dir / "**" / "d" / "*"), recursive=True) if os.path.isfile(f)]
        assert files
        for f in files:
            os.truncate(f, 7)
    else:
        for f in glob.glob(str(state_dir / "*")):
            if os.path.isfile(f):
                os.remove(f)
    fresh = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    with caplog.at_level(logging.WARNING, logger="vaopd_jax.checkpoint"):
        restored = fresh.restore_latest(ckpt_lib.abstract_like(make_state()))
    assert restored.step == 1
    assert_state_equal(restored.state, make_state(1.0, 1))
    assert "checkpoint step 2" in caplog.text and "incomplete or corrupt" in caplog.text
    # Moved aside, so step 2 can be written again when the run gets there.
    assert fresh.all_steps() == [1]
    assert len(os.listdir(tmp_path / "checkpoints_corrupt")) == 1
    assert fresh.save(2, make_state(3.0, 2))


def test_interrupted_save_leaves_no_step(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    manager.save(1, make_state(1.0, 1))
    manager.close()
    # What a kill -9 during a save leaves behind: Orbax's temporary directory.
    tmp_dir = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
    tmp_dir.mkdir()
    (tmp_dir / "partial").write_text("x")
    fresh = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    assert fresh.restore_latest(ckpt_lib.abstract_like(make_state())).step == 1
    assert not tmp_dir.exists()


def test_best_is_strictly_better_and_earliest_wins_ties(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path))
    params = lambda s: make_state(s)["params"]
    assert manager.maybe_save_best(10, params(1.0), 0.40)
    assert not manager.maybe_save_best(20, params(2.0), 0.40)   # tie: step 10 stays best
    assert not manager.maybe_save_best(30, params(3.0), 0.30)
    assert manager.maybe_save_best(40, params(4.0), 0.55)
    manager.wait()
    fresh = ckpt_lib.CheckpointManager(str(tmp_path))
    assert fresh.best_info == {"step": 40, "accuracy": 0.55}
    assert_state_equal(fresh.restore_best(ckpt_lib.abstract_like(params(0.0))), params(4.0))
    # A resumed run replaying step 40 with the same accuracy keeps the stored best.
    assert not fresh.maybe_save_best(40, params(5.0), 0.55)


def test_checkpoint_of_another_model_is_a_clear_error_and_is_kept(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=2, save_every=1, async_save=False)
    manager.save(1, make_state(1.0, step=1))
    manager.wait()
    wider = make_state()
    wider["params"]["b"] = jnp.zeros((5,))  # another model: same tree, other shape
    fresh = ckpt_lib.CheckpointManager(str(tmp_path), keep=2, save_every=1, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different model or optimizer.*new directory"):
        fresh.restore_latest(ckpt_lib.abstract_like(wider))
    assert os.path.isdir(os.path.join(str(tmp_path), ckpt_lib.STATE_DIR, "1"))  # not moved aside as corrupt
    assert not os.path.exists(os.path.join(str(tmp_path), ckpt_lib.CORRUPT_DIR))
