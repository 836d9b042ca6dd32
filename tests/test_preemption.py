"""Stop requests: signal handlers in one process, and the agreement of 2 processes (gloo) on where to stop.

The 2-process cases run tests/preemption_worker.py (a toy loop with the trainer's check points):
SIGTERM to both or to only one process, and SIGINT, each stop both processes at the same check
point with exit code 0 and a complete checkpoint; resuming reproduces the uninterrupted sums.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from subprocess_lines import read_until
from vaopd_jax.runtime import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "preemption_worker.py")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_stop_flag_and_a_second_one_is_only_reported(signum, capfd):
    previous = signal.getsignal(signum)
    stop = preemption.StopRequest().install()
    try:
        assert not stop.reached("before step 1")
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
        assert stop.signal_name == signal.Signals(signum).name
        os.kill(os.getpid(), signum)  # again "during the save": reported, nothing else
        time.sleep(0.05)
        assert stop.reached("before step 2") and stop.stopped_at == "before step 2"
        assert stop.reached("after the rollout of step 2") and stop.stopped_at == "before step 2"
    finally:
        stop.uninstall()
    err = capfd.readouterr().err
    name = signal.Signals(signum).name
    assert f"received {name}: stopping at the next check point" in err
    assert f"received {name} again: already stopping" in err
    assert signal.getsignal(signum) == previous


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, steps, step_seconds=0.3, **extra_env):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="2", **extra_env)
    return [subprocess.Popen([sys.executable, WORKER, workdir, str(steps), str(step_seconds)],
                             env=dict(env, JAX_PROCESS_ID=str(i)), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout=120):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a process did not stop in time (hang)")
    return outs


def _sums(stdout):
    return {int(line.split()[1]): float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")}


def _expected_sums(steps):
    """The uninterrupted run: w (8x4) grows by the mean of each global batch (2 processes x 2 records)."""
    import grain

    shards = [iter(grain.MapDataset.range(10_000).seed(0).shuffle().repeat()[i::2].batch(2).to_iter_dataset())
              for i in range(2)]
    w, out = np.zeros((8, 4), np.float32), {}
    for step in range(1, steps + 1):
        batch = np.concatenate([next(s) for s in shards])
        w = w + np.float32(batch.mean())
        out[step] = float(w.sum())
    return out


@pytest.mark.parametrize("target", ["sigterm_both", "sigterm_one", "sigint_one", "sigterm_one_without_service"])
def test_two_processes_stop_at_the_same_point_and_resume_exactly(tmp_path, target):
    """Each case stops both processes cleanly at one check point; one case (to keep the suite short) resumes.

    Without JAX's preemption service the processes all-gather their flags at each check point instead.
    """
    workdir = str(tmp_path / "run")
    extra = {"WORKER_NO_PREEMPTION_SERVICE": "1"} if target.endswith("without_service") else {}
    procs = _launch(workdir, steps=40, **extra)
    head = read_until(procs[0], "step 2 ")  # a few steps in: signal once step 2 is done
    sig = signal.SIGINT if target == "sigint_one" else signal.SIGTERM
    receivers = procs if target == "sigterm_both" else procs[1:]
    for p in receivers:
        os.kill(p.pid, sig)
    start = time.time()
    if target == "sigterm_both":  # and again once the save has begun: only reported, the checkpoint stays whole
        head += read_until(procs[0], "saving ")
        for p in receivers:
            os.kill(p.pid, sig)
    outs = _finish(procs)
    outs[0] = (head + outs[0][0], outs[0][1])
    assert time.time() - start < 60
    stopped = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        lines = [line for line in out.splitlines() if line.startswith("stopped ")]
        assert len(lines) == 1, out
        stopped.append(lines[0])
    assert stopped[0].split(" (signal")[0] == stopped[1].split(" (signal")[0]  # the same point on both processes
    reached = int(stopped[0].split("checkpoint at step ")[1].split()[0])
    assert reached >= 2
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == reached and reached < 40  # complete checkpoint at the step reached, rollout discarded
    if target != "sigterm_both":
        return

    total = reached + 3
    outs = _finish(_launch(workdir, steps=total, step_seconds=0.0))
    resumed = _sums(outs[0][0])
    assert f"resumed at step {reached}" in outs[0][0]
    assert sorted(resumed) == list(range(reached + 1, total + 1))
    expected = _expected_sums(total)
    for step, value in resumed.items():
        assert value == pytest.approx(expected[step], rel=1e-6), step
