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

from vaopd_jax.runtime import checkpoint as ckpt_lib


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


def test_a_position_taken_before_the_last_batch_is_saved_instead_of_the_iterators(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), async_save=False)
    it = make_iterator()
    next(it)
    position = it.get_state()  # a stop discards the step whose batch comes next
    discarded = next(it)
    manager.save(1, make_state(1.0, 1), data_state=position)
    it2 = make_iterator()
    ckpt_lib.CheckpointManager(str(tmp_path)).restore_latest(ckpt_lib.abstract_like(make_state()), data_iterator=it2)
    np.testing.assert_array_equal(next(it2), discarded)


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
    with caplog.at_level(logging.WARNING, logger="vaopd_jax.runtime.checkpoint"):
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


# ----------------------------------------------------------------------------- elastic restore
RESTORE_ELSEWHERE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from vaopd_jax.runtime import checkpoint as ckpt_lib
workdir, fsdp = sys.argv[1], int(sys.argv[2])
mesh = jax.make_mesh((fsdp,), ("fsdp",))
target = {"params": {"w": jax.device_put(jnp.zeros((16, 4)), NamedSharding(mesh, P("fsdp"))), "b": jnp.zeros((3,))},
          "opt": {"mu": jnp.zeros((16, 4))}, "step": jnp.int32(0), "rng": jax.random.key(0)}
manager = ckpt_lib.CheckpointManager(workdir, keep=5, async_save=False)
restored = manager.restore_latest(ckpt_lib.abstract_like(target))
w = restored.state["params"]["w"]
print(json.dumps({"step": restored.step, "topology": restored.topology, "devices": len(w.sharding.device_set),
                  "w": np.asarray(w).tolist(), "rng": np.asarray(jax.random.key_data(restored.state["rng"])).tolist()}))
# Continue on this mesh: one more "step", saved for the next device count.
state = jax.tree.map(lambda x: x, restored.state)
state["params"]["w"] = state["params"]["w"] * 2 + 1
state["step"] = state["step"] + 1
manager.save(restored.step + 1, state, force=True)
manager.close()
"""


def restore_on(workdir, devices):
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=repo)
    proc = subprocess.run([sys.executable, "-c", RESTORE_ELSEWHERE, workdir, str(devices)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checkpoint_restores_on_other_device_counts_and_back(tmp_path):
    """8 devices (fsdp=8) -> 4 (fsdp=4) -> 1 -> 8: each restores the previous mesh's arrays exactly."""
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=5, async_save=False)
    state = make_state(2.0, step=4)
    manager.save(4, state)
    manager.close()
    w = np.asarray(state["params"]["w"])
    on4 = restore_on(str(tmp_path), 4)
    assert on4["step"] == 4 and on4["devices"] == 4 and on4["topology"] == {"processes": 1, "devices": 8}
    np.testing.assert_array_equal(np.asarray(on4["w"]), w)
    np.testing.assert_array_equal(on4["rng"], np.asarray(jax.random.key_data(state["rng"])))
    on1 = restore_on(str(tmp_path), 1)  # restores step 5, written on 4 devices
    assert on1["step"] == 5 and on1["devices"] == 1 and on1["topology"] == {"processes": 1, "devices": 4}
    np.testing.assert_array_equal(np.asarray(on1["w"]), w * 2 + 1)
    back = ckpt_lib.CheckpointManager(str(tmp_path), keep=5).restore_latest(ckpt_lib.abstract_like(make_state()))
    assert back.step == 6 and back.topology == {"processes": 1, "devices": 1}
    assert back.state["params"]["w"].sharding == state["params"]["w"].sharding  # fsdp=8 again
    np.testing.assert_array_equal(np.asarray(back.state["params"]["w"]), (w * 2 + 1) * 2 + 1)


class ReshardingIterator:
    """Stands in for the pipeline's iterator: records the per-process states it re-derives its position from."""

    def __init__(self):
        self.state = self.states = None

    def get_state(self):
        return {"position": 0}

    def set_state(self, state):
        self.state = state

    def set_state_from_processes(self, states):
        self.states = states
        return f"re-derived from {len(states)} processes"


def test_data_position_written_by_another_process_count(tmp_path):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    it = make_iterator()
    manager.save(1, make_state(1.0, 1), data_iterator=it)
    manager.save(2, make_state(2.0, 2), data_iterator=it)
    manager.close()
    # What two processes would have written at step 2 (this test runs one process).
    data = tmp_path / "checkpoints" / "2" / "data"
    os.remove(data / "process_0-of-1.json")
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(f'{{"position": {10 + i}}}')

    plain = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="data positions of 2 processes, this run has 1"):
        plain.restore_latest(ckpt_lib.abstract_like(make_state()), data_iterator=make_iterator())
    assert plain.all_steps() == [1, 2]  # not moved aside as corrupt

    resharding = ReshardingIterator()
    restored = ckpt_lib.CheckpointManager(str(tmp_path), keep=3).restore_latest(
        ckpt_lib.abstract_like(make_state()), data_iterator=resharding)
    assert restored.step == 2 and restored.data_note == "re-derived from 2 processes"
    assert resharding.states == [{"position": 10}, {"position": 11}] and resharding.state is None

    os.remove(data / "process_1-of-2.json")  # one process's position missing: the step is unusable
    fresh = ckpt_lib.CheckpointManager(str(tmp_path), keep=3, async_save=False)
    same_count = ReshardingIterator()
    restored = fresh.restore_latest(ckpt_lib.abstract_like(make_state()), data_iterator=same_count)
    assert restored.step == 1 and restored.data_note is None
    assert same_count.state == it.get_state() and same_count.states is None  # written by this process count


def _signature(**changes):
    from vaopd_jax import config as config_lib
    from vaopd_jax.models.qwen3_vl import testing

    config = config_lib.load_sibling(os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"),
                                     "demo").get_config(None)
    student = testing.tiny_config()
    for name, value in changes.items():
        if name == "student_mlp":
            import dataclasses

            student = student.replace(text=dataclasses.replace(student.text, intermediate_size=value))
        else:
            section, field = name.split("__")
            config[section][field] = value
    return ckpt_lib.run_signature(config, student, testing.tiny_config())


def test_resume_across_a_config_change_is_refused_naming_each_difference_unless_allowed(tmp_path, caplog):
    manager = ckpt_lib.CheckpointManager(str(tmp_path), async_save=False, run=_signature())
    manager.save(2, make_state(1.0, 2))
    changed = _signature(rollout__num_rollouts=3, optim__lr=2e-3, student_mlp=256)
    fresh = ckpt_lib.CheckpointManager(str(tmp_path), async_save=False, run=changed)
    with pytest.raises(ckpt_lib.ResumeMismatchError) as err:
        fresh.restore_latest(ckpt_lib.abstract_like(make_state()))
    message = str(err.value)
    assert "config.rollout.num_rollouts: 4 in the checkpoint, 3 now" in message
    assert "config.optim.lr: 0.0015 in the checkpoint, 0.002 now" in message
    assert "student.text.intermediate_size: 128 in the checkpoint, 256 now" in message
    assert "--config.train.resume_across_changes=optim.lr,rollout.num_rollouts,student.text.intermediate_size" \
        in message
    assert fresh.all_steps() == [2]  # refused, not treated as corrupt
    # Allowing only some of the differences still refuses, naming the others.
    partial = ckpt_lib.CheckpointManager(str(tmp_path), async_save=False, run=changed,
                                         resume_across_changes=("optim.lr",))
    with pytest.raises(ckpt_lib.ResumeMismatchError, match="num_rollouts") as err:
        partial.restore_latest(ckpt_lib.abstract_like(make_state()))
    assert "optim.lr" not in str(err.value)
    # A new learning rate, on purpose: resumed, the change logged; later checkpoints record the new value.
    lr_only = _signature(optim__lr=2e-3)
    allowed = ckpt_lib.CheckpointManager(str(tmp_path), async_save=False, run=lr_only,
                                         resume_across_changes=("optim.lr",))
    with caplog.at_level(logging.WARNING):
        restored = allowed.restore_latest(ckpt_lib.abstract_like(make_state()))
    assert restored.step == 2 and "optim.lr 0.0015 -> 0.002" in caplog.text
    allowed.save(3, make_state(1.0, 3))
    assert ckpt_lib.CheckpointManager(str(tmp_path), run=lr_only).restore_latest(
        ckpt_lib.abstract_like(make_state())).step == 3
    with pytest.raises(ValueError, match=r"\['optim.learning_rate'\] are not recorded in checkpoints"):
        ckpt_lib.CheckpointManager(str(tmp_path), run=lr_only, resume_across_changes=("optim.learning_rate",))
    # The mesh, the step count and paths are not part of it (elastic restore, extending a run, moving a workdir).
    assert not any(name.startswith(("mesh.", "train.", "teacher.hf", "data.train_path")) for name in lr_only)


def test_a_checkpoint_that_cannot_be_written_names_the_step_and_keeps_the_last_good_one(tmp_path):
    import resource
    import signal

    noise = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)  # incompressible: 1 MiB
    big = lambda scale, step: {**make_state(scale, step), "big": jnp.asarray(noise * scale)}  # noqa: E731
    manager = ckpt_lib.CheckpointManager(str(tmp_path), async_save=True)
    manager.save(1, big(1.0, 1))
    manager.wait()
    cleaned = []
    manager.on_write_error = lambda: cleaned.append(True)
    # A full disk, as the kernel reports it to any process (root included): writes past 64 KiB fail (EFBIG).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        manager.save(2, big(2.0, 2))  # asynchronous: the failure surfaces when waited for
        with pytest.raises(ckpt_lib.CheckpointWriteError) as err:
            manager.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    message = str(err.value)
    assert "checkpoint step 2 could not be written" in message and cleaned == [True]
    assert f"the latest complete checkpoint is {tmp_path / 'checkpoints' / '1'}" in message
    fresh = ckpt_lib.CheckpointManager(str(tmp_path))
    assert fresh.all_steps() == [1]  # the half-written step is never listed
    restored = fresh.restore_latest(ckpt_lib.abstract_like(big(0.0, 0)))
    assert restored.step == 1
    assert_state_equal(restored.state, big(1.0, 1))
    # Once there is room again, the run writes that step anew over what the failed save left.
    assert fresh.save(2, big(2.0, 2))
    fresh.wait()
    assert ckpt_lib.CheckpointManager(str(tmp_path)).restore_latest(ckpt_lib.abstract_like(big(0.0, 0))).step == 2
