"""End-to-end `python -m vaopd_jax.train` runs as subprocesses (tiny models, CPU, a few steps).

One uninterrupted reference run, then: kill -9 mid-run + restart (with an
incomplete latest checkpoint planted) must reproduce its params and logged
losses exactly; bad configs fail before compute; repeated non-finite steps stop
the run with a clear message and a good checkpoint; 2 processes x 4 CPU devices
(gloo) train, checkpoint and resume. Runs share a persistent compilation cache.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime_env import runtime_env
from subprocess_lines import read_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 4
# XLA's cheapest CPU compilation: the tiny runs are mostly compilation, and every run of a test compiles alike.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vision_depth=1, vision_hidden=32)


def make_shared(root) -> dict:
    """A random tiny teacher in Hugging Face format under `root` and a compilation cache shared by the runs."""
    import jax.numpy as jnp
    from flax import nnx

    from vaopd_jax import config as config_lib
    from vaopd_jax.models import qwen3_vl

    teacher = qwen3_vl.Qwen3VL(config_lib.model_config_from_spec(config_lib.tiny_spec(**TINY)),
                               param_dtype=jnp.float32, rngs=nnx.Rngs(5))
    qwen3_vl.save_hf_checkpoint(teacher, str(root / "teacher"))
    # VAOPD_TEST_JAX_CACHE keeps compiled programs across test sessions (local iteration).
    cache = os.environ.get("VAOPD_TEST_JAX_CACHE") or str(root / "jax_cache")
    return {"root": root, "teacher": str(root / "teacher"), "cache": cache}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return make_shared(tmp_path_factory.mktemp("train"))


def train_args(shared, workdir, *extra):
    t = TINY
    return [
        sys.executable, "-m", "vaopd_jax.train", "--config", os.path.join(REPO, "configs", "demo.py"),
        f"--config.workdir={workdir}", "--config.teacher.init=hf", "--config.student.init=random",
        f"--config.teacher.hf_path={shared['teacher']}",
        "--config.data.task_vocabulary=False",  # a full-vocabulary HF teacher
        f"--config.student.tiny.text.hidden_size={t['hidden']}",
        f"--config.student.tiny.text.num_hidden_layers={t['layers']}",
        f"--config.student.tiny.text.intermediate_size={t['mlp']}",
        f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
        "--config.data.prompts_per_step=2", "--config.rollout.num_rollouts=2", "--config.rollout.max_new_tokens=4",
        "--config.eval.every=2", "--config.eval.num_problems=4", "--config.eval.batch_size=4",
        "--config.eval.max_new_tokens=4", "--config.data.synthetic_train_size=64",
        "--config.model.attention_impl=chunked", "--config.model.attention_chunk_size=16",
        *extra,
    ]


def env_for(shared, devices=1, **extra):
    # The runs see only what `pip install -e .` installs (tests/runtime_env.py): no torch, no test extras.
    env = runtime_env()
    env.update({
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
        "JAX_COMPILATION_CACHE_DIR": shared["cache"], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    env.update(extra)
    return env


def run(args, env, timeout=600):
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc


def train_losses(workdir):
    from vaopd_jax.runtime import metrics as metrics_lib

    return [(r["step"], r["train/loss"]) for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"),
                                                                          kind="train")]


def export_tensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def reference(shared):
    """The uninterrupted run every other run is compared with."""
    workdir = str(shared["root"] / "reference")
    proc = run(train_args(shared, workdir), env_for(shared))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"workdir": workdir, "stdout": proc.stdout, "stderr": proc.stderr}


def test_checkpoints_load_with_the_runs_attention_options(shared):
    import importlib

    import jax.numpy as jnp

    load_lib = importlib.import_module("vaopd_jax.models.load")
    config = module_config("demo")
    config.model.attention_impl, config.model.attention_chunk_size = "chunked", 16
    options = importlib.import_module("vaopd_jax.config").load(config, check_paths=False).model
    model = load_lib.load_model(options, shared["teacher"], None, dtype=jnp.float32)
    assert (model.config.attention_impl, model.config.attention_chunk_size) == ("chunked", 16)


def module_config(name):
    from vaopd_jax import config as config_lib

    return config_lib.load_sibling(os.path.join(REPO, "configs", "base.py"), name).get_config(None)


def test_run_writes_tensorboard_checkpoints_and_hf_export(reference):
    from vaopd_jax.runtime import metrics as metrics_lib

    workdir = reference["workdir"]
    scalars = metrics_lib.read_tensorboard_scalars(os.path.join(workdir, "tb"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for _, v in scalars["train/loss"])
    for tag in ("train/kl", "train/va_mean", "train/grad_norm", "time/rollout_s", "time/update_s",
                "perf/tokens_per_s", "val/accuracy", "val/student_va_mean", "data/skipped"):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["val/accuracy"]] == [0, 2, 4]
    # Wall time and peak RSS per phase (vaopd_jax.runtime.phases), printed and in phases.json for bench.demo.
    with open(os.path.join(workdir, "phases.json"), encoding="utf-8") as f:
        phases = {p["name"]: p for p in json.load(f)["phases"]}
    assert {"start-up", "teacher load", "student load", "set-up", "validation", "distillation", "checkpoint",
            "export"} == set(phases)
    assert (phases["distillation"]["calls"], phases["validation"]["calls"]) == (STEPS, 3)
    assert all(p["peak_rss"] > 100 * 2 ** 20 and p["wall_s"] > 0 for p in phases.values())
    assert "whole process" in reference["stdout"]
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4]
    assert "step 4/4 | loss" in reference["stdout"] and "mean student VA" in reference["stdout"]
    # The start-up line names the backend; chunked attention (a GPU/TPU setting) on CPU is warned about.
    assert "devices: 1 x cpu in 1 process(es) (backend cpu" in reference["stdout"]
    assert "meant for GPUs/TPUs (attention_impl='chunked')" in reference["stderr"]

    import torch
    from transformers import Qwen3VLForConditionalGeneration

    final = os.path.join(workdir, "export", "final")
    hf = Qwen3VLForConditionalGeneration.from_pretrained(final, torch_dtype=torch.float32)
    tensors = export_tensors(final)
    hf_state = hf.state_dict()
    for name, value in tensors.items():
        np.testing.assert_array_equal(hf_state[name].numpy(), value)
    assert os.path.exists(os.path.join(final, "tokenizer.json"))
    assert os.path.exists(os.path.join(workdir, "export", "best", "model.safetensors"))


def test_kill_and_resume_equals_uninterrupted_run(shared, reference):
    workdir = str(shared["root"] / "killed")
    proc = subprocess.Popen(train_args(shared, workdir), env=env_for(shared), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    ckpts = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 600
    for line in proc.stdout:  # kill -9 mid-run: once step 3 is logged and step 2's (async) save is complete
        if line.startswith("step 3/"):
            break
    while not os.path.isdir(os.path.join(ckpts, "2")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "4" not in os.listdir(ckpts)
    # An incomplete latest step (arrays missing): the restart must skip it with a warning.
    shutil.copytree(os.path.join(ckpts, "2"), os.path.join(ckpts, "3"))
    shutil.rmtree(os.path.join(ckpts, "3", "state"))
    os.makedirs(os.path.join(ckpts, "3", "state"))

    resumed = run(train_args(shared, workdir), env_for(shared))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step 3" in resumed.stderr and "incomplete or corrupt" in resumed.stderr
    assert "resumed from" in resumed.stdout and os.path.join("checkpoints", "2") in resumed.stdout
    assert train_losses(workdir) == train_losses(reference["workdir"])
    ours = export_tensors(os.path.join(workdir, "export", "final"))
    ref = export_tensors(os.path.join(reference["workdir"], "export", "final"))
    assert ours.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_sigterm_mid_step_saves_a_complete_checkpoint_and_resumes_exactly(shared, reference, tmp_path):
    """SIGTERM during step 2: exit 0 with a checkpoint at the step reached; the resumed run equals the reference.
    A second SIGTERM during the save is only reported: the checkpoint is committed whole.

    This is also the second start of the reference config: it compiles nothing (persistent cache).
    """
    workdir = str(shared["root"] / "sigterm")
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(train_args(shared, workdir), env=env_for(shared), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        head = read_until(proc, "step 1/")
        assert proc.poll() is None, "the run ended before it could be stopped"
        os.kill(proc.pid, signal.SIGTERM)
        signalled = time.time()
        head += read_until(proc, "stopping ")  # the save begins
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        stop_s = time.time() - signalled
        err.seek(0)
        stderr = err.read()
    out = head + out
    assert proc.returncode == 0, stderr[-3000:]
    assert stop_s < 120, stop_s  # the rest of one step, validation at most, and the save
    assert "received SIGTERM: stopping at the next check point" in stderr
    assert "received SIGTERM again: already stopping" in stderr
    stopped = [line for line in out.splitlines() if line.startswith("stopped ")]
    assert len(stopped) == 1 and "(SIGTERM)" in stopped[0] and "is complete" in stopped[0], out
    reached = int(stopped[0].split(os.path.join("checkpoints", ""))[1].split()[0])
    ckpts = os.path.join(workdir, "checkpoints")
    assert max(int(d) for d in os.listdir(ckpts) if d.isdigit()) == reached and reached < STEPS
    assert not [d for d in os.listdir(ckpts) if "tmp" in d]  # committed: no temporary directory left
    assert [s for s, _ in train_losses(workdir)] == list(range(1, reached + 1))
    assert "start-up " in out and "compilation over the run: 0 programs compiled" in stopped[0]

    resumed = run(train_args(shared, workdir), env_for(shared))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert os.path.join("checkpoints", str(reached)) in resumed.stdout
    assert train_losses(workdir) == train_losses(reference["workdir"])
    ours = export_tensors(os.path.join(workdir, "export", "final"))
    ref = export_tensors(os.path.join(reference["workdir"], "export", "final"))
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_bad_configs_fail_before_compute(shared, tmp_path):
    """Every problem of the command line and the config at once, one line each, a non-zero exit before any
    compile, and an existing workdir left as it was."""
    workdir = tmp_path / "bad"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine")
    proc = run(train_args(shared, str(workdir), "--config.va.p_v=1.5", "--config.va.lam=-0.5",
                          "--config.method=reweight_only", "--config.rollout.num_rollouts=1",
                          "--config.teacher.hf_path=/no/such/teacher", "--config.optim.lrr=1",
                          "--config.data.min_pixels=many", "--config.mesh.fsdp=3", "--config.data.prompts_per_step=3",
                          "--config.rollout.max_new_tokens=300000", "--bogus"),
               env_for(shared, devices=2), timeout=120)
    assert proc.returncode != 0
    for expected in ("config.va.p_v = 1.5: must be in (0, 1]", "config.va.lam = -0.5: must be in [0, 1]",
                     "config.rollout.num_rollouts = 1: must be >= 2 with method='reweight_only'",
                     "config.teacher.hf_path = '/no/such/teacher': must be a local Hugging Face",
                     "--config.optim.lrr=1: unknown field (config.optim has no 'lrr'; did you mean 'lr'?)",
                     "--config.data.min_pixels=many: expected an integer", "--bogus: unknown flag",
                     "config.mesh = {'data': -1, 'fsdp': 3, 'expert': 1, 'tensor': 1}: the fixed axes need a multiple "
                     "of 3 devices; this run has 2"):
        assert expected in proc.stderr, expected
    assert "Traceback" not in proc.stderr and "compiled" not in proc.stdout
    assert sorted(os.listdir(workdir)) == ["keep.txt"] and (workdir / "keep.txt").read_text() == "mine"
    # On two devices the batch must split over the data axis; a response must fit the models' positions.
    proc = run(train_args(shared, str(tmp_path / "bad2"), "--config.data.prompts_per_step=3", "--config.method=opd",
                          "--config.rollout.num_rollouts=1", "--config.rollout.max_new_tokens=300000"),
               env_for(shared, devices=2), timeout=120)
    assert proc.returncode != 0 and not (tmp_path / "bad2").exists()
    assert "x rollout.num_rollouts = 3 rollouts per step must be divisible by the batch axes" in proc.stderr
    assert "exceeds the teacher's" in proc.stderr and "max_position_embeddings" in proc.stderr


def test_student_teacher_vocab_mismatch_fails(shared, tmp_path):
    proc = run(train_args(shared, str(tmp_path / "vocab"), "--config.student.tiny.text.vocab_size=152000"),
               env_for(shared), timeout=120)
    assert proc.returncode != 0
    assert "student vocabulary size 152000 != teacher vocabulary size 151936" in proc.stderr


def test_repeated_nonfinite_steps_stop_with_last_good_checkpoint(shared, tmp_path):
    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "nan")
    # The fault (NaN pixel values from the 3rd step on) comes from a wrapper around the trainer, not its config.
    args = train_args(shared, workdir, "--config.train.max_nonfinite_steps=2", "--config.train.num_steps=8",
                      "--config.eval.every=0")
    proc = run([sys.executable, os.path.join(REPO, "tests", "nonfinite_train.py"), "3", *args[3:]], env_for(shared))
    assert proc.returncode != 0
    assert "stopping at step 4: 2 consecutive steps had a non-finite loss or gradient" in proc.stderr
    assert "holds the params of the last good step 2" in proc.stderr
    records = {s: loss for s, loss in train_losses(workdir)}
    assert np.isfinite(records[2]) and not np.isfinite(float(records[3]))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.all_steps() == [2, 4]
    state = lambda step: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    good, stopped = state(2), state(4)
    assert int(stopped["step"]) == 4
    import jax

    for a, b in zip(jax.tree.leaves(good["params"]), jax.tree.leaves(stopped["params"])):
        np.testing.assert_array_equal(a, b)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_stop_on_one_sigterm_and_continue_on_4_devices(shared, tmp_path):
    """2 processes x 4 devices: a SIGTERM to process 1 only stops both at the same point (exit 0, checkpoint);
    the checkpoint (8 devices, 2 processes) restores on 4 devices in one process, where training continues."""
    workdir = str(tmp_path / "multi")

    def launch(steps, signal_after=None):
        port = _free_port()
        procs, errs = [], []
        for i in range(2):
            errs.append(open(tmp_path / f"stderr{i}.{steps}.txt", "w+"))
            procs.append(subprocess.Popen(
                train_args(shared, workdir, f"--config.train.num_steps={steps}", "--config.eval.every=0",
                           "--config.train.checkpoint_every=1", "--config.data.prompts_per_step=4"),
                env=env_for(shared, devices=4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                            JAX_PROCESS_ID=str(i)),
                cwd=REPO, stdout=subprocess.PIPE, stderr=errs[-1], text=True))
        head = ""
        if signal_after:
            head = read_until(procs[0], signal_after)
            os.kill(procs[1].pid, signal.SIGTERM)
        outs = []
        for p, err in zip(procs, errs):
            out, _ = p.communicate(timeout=600)
            err.seek(0)
            outs.append((out, err.read()))
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return [(head + outs[0][0], outs[0][1]), outs[1]]

    first = launch(3, signal_after="step 1/3")
    assert "8 x cpu in 2 process(es)" in first[0][0] and "step 1/3" in first[0][0]
    assert "step " not in first[1][0] and "devices:" not in first[1][0]  # only process 0 prints progress
    assert "received SIGTERM" not in first[0][1]  # process 0 learnt of it from the coordination service
    stopped = [line for line in first[0][0].splitlines() if line.startswith("stopped ")]
    assert len(stopped) == 1, first[0][0]
    reached = int(stopped[0].split(os.path.join("checkpoints", ""))[1].split()[0])
    assert 1 <= reached < 3 and f"step {reached + 1}/3" not in first[0][0]
    assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == reached
    # Elastic (the same-process-count resume is tests/test_preemption.py's): the checkpoint of 8 devices in 2
    # processes restores on 4 devices in 1 process (fsdp=4), the data position re-derived from both processes'
    # records, and training continues to the end. A tiny watchdog limit reports every phase; the run carries on.
    quick = ("--config.eval.every=0", "--config.export.best=False", "--config.train.checkpoint_every=1",
             "--config.data.prompts_per_step=4")  # 8 rollouts a step: every device of the 8 gets one
    on4 = run(train_args(shared, workdir, "--config.train.num_steps=3", "--config.mesh.fsdp=4",
                         "--config.train.watchdog.timeout_s=0.001", "--config.train.watchdog.first_timeout_s=0.001",
                         *quick), env_for(shared, devices=4))
    assert on4.returncode == 0, on4.stderr[-3000:]
    assert "written by 2 process(es) with 8 devices, restored onto this mesh" in on4.stdout
    assert ("from the 2 processes that wrote the checkpoint: the global record stream resumes at record "
            f"{4 * reached} (exact)") in on4.stdout
    assert "step 3/3" in on4.stdout and [s for s, _ in train_losses(workdir)] == [1, 2, 3]
    assert np.isfinite(train_losses(workdir)[2][1])
    assert "watchdog: phase 'rollout' of step 3 has run" in on4.stderr and 'Thread "MainThread"' in on4.stderr
