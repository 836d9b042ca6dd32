"""A toy training loop with the trainer's stop protocol, run as a subprocess by test_preemption.py.

    python tests/preemption_worker.py WORKDIR NUM_STEPS [STEP_SECONDS]

State: a (8, 4) float32 array sharded over all devices plus the step; each step adds the mean of
a global batch of grain records (every process reads its slice, the batch is all-gathered). The
loop has the trainer's two check points per step: before the "rollout" (a sleep standing in for
sampling) and after it, where a stop discards the rollout and rewinds the data iterator. On a
stop it saves a checkpoint at the step reached, waits for it and exits 0. Prints one line per
finished step: 'step <n> sum <float>'.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from vaopd_jax.parallel import mesh as mesh_lib  # noqa: E402

if os.environ.get("WORKER_NO_PREEMPTION_SERVICE"):  # the fallback: processes all-gather their stop flags
    jax.config.update("jax_enable_preemption_service", False)
mesh_lib.maybe_initialize_distributed()

import grain  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vaopd_jax.runtime import checkpoint as ckpt_lib  # noqa: E402
from vaopd_jax.runtime import preemption  # noqa: E402

GLOBAL_BATCH = 4


def data_iterator():
    n, i = jax.process_count(), jax.process_index()
    ds = grain.MapDataset.range(10_000).seed(0).shuffle().repeat()[i::n].batch(GLOBAL_BATCH // n)
    return iter(ds.to_iter_dataset())


def global_batch(local):
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def main():
    workdir, num_steps = sys.argv[1], int(sys.argv[2])
    step_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.3
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    sharding = NamedSharding(mesh, P("fsdp"))
    state = {"w": jax.make_array_from_callback((8, 4), sharding, lambda idx: np.zeros((8, 4), np.float32)[idx]),
             "step": jax.make_array_from_callback((), NamedSharding(mesh, P()), lambda idx: np.int32(0))}
    it = data_iterator()
    ckpt = ckpt_lib.CheckpointManager(workdir, keep=2, save_every=2)
    restored = ckpt.restore_latest(ckpt_lib.abstract_like(state), data_iterator=it)
    if restored is not None:
        state = restored.state
        print(f"resumed at step {restored.step}", flush=True)
    update = jax.jit(lambda s, mean: {"w": s["w"] + mean, "step": s["step"] + 1}, donate_argnums=0)

    stop = preemption.StopRequest().install()
    step = int(multihost_utils.process_allgather(state["step"], tiled=True)) if jax.process_count() > 1 \
        else int(state["step"])
    while step < num_steps:
        if stop.reached(f"before step {step + 1}"):
            break
        position = it.get_state()
        batch = global_batch(next(it))
        time.sleep(step_seconds)  # the "rollout"
        if stop.reached(f"after the rollout of step {step + 1}"):
            it.set_state(position)  # the rollout is discarded: its prompts come again after the resume
            break
        state = update(state, jnp.float32(batch.mean()))
        step += 1
        total = float(multihost_utils.process_allgather(state["w"], tiled=True).sum()) if jax.process_count() > 1 \
            else float(state["w"].sum())
        print(f"step {step} sum {total!r}", flush=True)
        ckpt.save(step, state, data_iterator=it)
    if stop.stopped_at is not None:
        print(f"saving step {step}", flush=True)
        ckpt.save(step, state, data_iterator=it, force=True)
        ckpt.wait()
        print(f"stopped {stop.stopped_at}; checkpoint at step {step} (signal {stop.signal_name})", flush=True)
    ckpt.wait()
    ckpt.close()
    stop.uninstall()


if __name__ == "__main__":
    main()
