r"""python -m vaopd_jax.train --config configs/demo.py [--config.field=value ...]

The VA-OPD training loop. `run(config)` is the loop, read top to bottom; the command calls it, and so does
`python -m vaopd_jax.study` (all its runs in one process, sharing the compiled programs). Its sections:
1. config, processes, mesh (validated once, before any compute or file is written); 2. tokenizer, teacher,
student; 3. data and samplers; 4. optimizer, state, the fused step; 5. checkpoints (resume on any mesh) and
logs; 6. the loop: prompts -> rollouts -> TrainBatch -> step -> metrics, with periodic validation, the best
checkpoint, and a clean stop on SIGTERM/SIGINT; 7. export to Hugging Face format and the summary table.

Multi-host: the same command on every host (jax.distributed from the environment); each process loads its
slice of the data, the slices are exchanged once per step, only process 0 writes logs and exports. Outputs under
--config.workdir: checkpoints/, checkpoints_best/, tb/, metrics.jsonl, export/{final,best}, phases.json.
docs/architecture.md follows a batch through the modules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

STARTED = time.monotonic()  # start-up is timed from here: before JAX, the models and the data load

from vaopd_jax.runtime import host_malloc

if __name__ == "__main__":
    # Before JAX allocates anything: XLA's per-step temporaries come in as 2 MiB pages, not 4 KiB ones (on
    # CPU the page faults took 40 % of the demo's CPU time). Re-executes this command once.
    host_malloc.reexec_with_hugepages()

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging as absl_logging

from vaopd_jax import config as config_lib
from vaopd_jax import sft
from vaopd_jax.data import splits, synthetic
from vaopd_jax.data import tokenizer as tokenizer_lib
from vaopd_jax.distill import batch as train_batch_lib
from vaopd_jax.distill import state as state_lib
from vaopd_jax.distill import step as step_lib
from vaopd_jax.eval import grading, validation
from vaopd_jax.models import compat
from vaopd_jax.models import load as load_lib
from vaopd_jax.parallel import backend as backend_lib
from vaopd_jax.parallel import mesh as mesh_lib
from vaopd_jax.parallel.multihost import host, primary, say
from vaopd_jax.rollout import sampler as sampler_lib
from vaopd_jax.runtime import checkpoint as ckpt_lib
from vaopd_jax.runtime import compile_cache, phases, preemption, watchdog
from vaopd_jax.runtime import metrics as metrics_lib

log = logging.getLogger("vaopd_jax.train")
PHASES_FILE = "phases.json"  # wall time and peak RSS per phase (phases.PhaseMeter), read by bench.demo
_RUNS: list = []  # the runs of this process (the study runs many)


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` consecutive skipped (non-finite) steps."""


@dataclasses.dataclass
class RunResult:
    """What `run` did: the steps taken, where it stopped early (None: it finished), the best validation step."""

    workdir: str
    step: int
    stopped_at: str | None
    best: dict | None


def run(config: config_lib.Config | ml_collections.ConfigDict) -> RunResult:
    """Trains a student as `config` says; returns when the run is done (or stopped by a signal, checkpointed)."""
    # ------------------------------------------------------------------ 1. config, processes, mesh
    started = STARTED if not _RUNS else time.monotonic()  # a later run of this process starts now
    _RUNS.append(config)
    meter = phases.PhaseMeter()  # wall time and peak RSS per phase: printed at the end, phases.json
    meter.begin("start-up")
    mesh_lib.maybe_initialize_distributed()
    if not isinstance(config, config_lib.Config):  # every problem at once, before any compile or file is written
        config = config_lib.load(config, device_count=jax.device_count(), process_count=jax.process_count())
    cache_dir = compile_cache.enable(config.train.compilation_cache_dir)  # before anything compiles
    compiles = compile_cache.CompileCounter()
    devices_line, backend_warnings = backend_lib.startup_report(  # warns when a GPU/TPU config lands on CPU
        backend_lib.backend_info(), dtype=config.model.dtype, attention_impl=config.model.attention_impl,
        mesh_shape=config.mesh.shape(), field_prefix="config.model.")
    for warning in backend_warnings:
        log.warning(warning)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, expert=config.mesh.expert)
    workdir = config.workdir
    if primary():
        os.makedirs(workdir, exist_ok=True)
    say(f"{devices_line}; mesh {dict(mesh.shape)}; workdir {workdir}")

    # ------------------------------------------------------------------ 2. tokenizer, teacher, student
    tokenizer = tokenizer_lib.load_tokenizer(
        config.tokenizer_path or (config.student.hf_path if config.student.init == "hf" else None))
    if config.data.task_vocabulary:  # the demo: tiny models over the synthetic task's tokens
        tokenizer = synthetic.task_tokenizer(tokenizer)
        say(f"task vocabulary: the tiny models' vocabulary is the synthetic task's {len(tokenizer)} Qwen tokens")
    meter.end("start-up")
    teacher, student = _models(config, tokenizer, mesh, meter)
    meter.begin("set-up")  # data, samplers, train state, step, checkpoint restore
    compat.check_pair(student.config, teacher.config, tokenizer=tokenizer,  # every difference, before compute
                      teacher_path=config.teacher.hf_path if config.teacher.init == "hf" else None)
    run_signature = ckpt_lib.run_signature(config, student.config, teacher.config)  # what a resume must share
    model_cfg = student.config
    n_student, n_teacher = load_lib.count_params(student), load_lib.count_params(teacher)
    say(f"student {n_student:,} params, teacher {n_teacher:,} params (frozen), method {config.method}")

    # ------------------------------------------------------------------ 3. data and samplers
    train_iter = splits.pipeline_for(config, tokenizer, model_cfg, split="train",
                                     batch_size=config.data.prompts_per_step)
    val_batches = [b.without_filler() for b in splits.pipeline_for(config, tokenizer, model_cfg, split="val",
                                                                   batch_size=config.eval.batch_size)]
    valid_vocab_size = tokenizer_lib.valid_vocab_size(tokenizer, model_cfg.text.vocab_size)
    common = dict(valid_vocab_size=valid_vocab_size, mesh=mesh, eos_token_ids=tokenizer_lib.end_token_ids(tokenizer))
    rollouts = sampler_lib.Sampler(student, **config.rollout.sampler_settings(), **common)
    e = config.eval  # greedy samples of one prompt are all the same: avg@k of k copies is the score of one
    val_rollouts = sampler_lib.Sampler(student, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                                       num_samples=1 if e.temperature == 0 else e.num_samples, top_p=e.top_p, **common)

    # ------------------------------------------------------------------ 4. optimizer, state, step
    total_steps = splits.train_steps(config)  # the release's count: epochs x full batches per epoch
    o = config.optim
    optimizer = state_lib.make_optimizer(o.lr, total_steps, o.warmup_fraction, o.b1, o.b2, o.weight_decay,
                                         o.clip_norm)
    state = state_lib.create_train_state(student, optimizer, jax.random.key(config.seed), remat=config.model.remat,
                                         mesh=mesh)
    teacher_graphdef, teacher_params = state_lib.split_teacher(teacher, mesh=mesh)
    del student, teacher
    num_rollouts = config.rollout.num_rollouts
    critical = synthetic.critical_token_ids(tokenizer) if config.data.source == "synthetic" else ()
    step_config = step_lib.StepConfig(
        num_rollouts=num_rollouts, objective=config.objective(), kl_chunk_size=config.model.kl_chunk_size,
        valid_vocab_size=valid_vocab_size, micro_batch_rollouts=config.train.micro_batch_rollouts or None,
        critical_token_ids=critical, log_visual_advantage=config.train.log_visual_advantage,
        log_token_gradients=config.train.log_token_gradients)
    train_step = step_lib.make_train_step(step_config, teacher_graphdef, optimizer, mesh=mesh,
                                          state_sharding=state_lib.train_state_sharding(state))

    # ------------------------------------------------------------------ 5. checkpoints and logs
    ckpt = ckpt_lib.CheckpointManager(workdir, keep=config.train.keep_checkpoints,
                                      save_every=config.train.checkpoint_every, async_save=config.train.async_checkpoint,
                                      run=run_signature, resume_across_changes=config.train.resume_across_changes)
    saved = lambda s: {"params": s.params, "opt_state": s.opt_state, "step": s.step, "rng": s.rng}  # noqa: E731
    restored = ckpt.restore_latest(ckpt_lib.abstract_like(saved(state)), data_iterator=train_iter)
    nonfinite_streak = 0
    if restored is not None:
        state = state.replace(**restored.state)
        nonfinite_streak = int(restored.meta.get("nonfinite_streak", 0))
        say(restored.describe(workdir, dict(mesh.shape)))
    step = int(host(state.step))
    logger = metrics_lib.MetricsLogger(workdir, total_steps=total_steps, is_primary=primary(), resume_step=step,
                                       console_every=config.train.log_every)
    peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops_per_device)
    teacher_views = 2 if step_config.pixelated_view else 1

    def run_validation(at_step):
        with dog.phase("validation", at_step), meter.phase("validation"):
            result = validation.validate_student(state.params, state.graphdef, val_batches, val_rollouts, tokenizer,
                                                 seed=config.seed, step=at_step, mesh=mesh,
                                                 kl_chunk_size=config.model.kl_chunk_size)
        logger.log_val(at_step, result)
        if ckpt.maybe_save_best(at_step, state.params, result["accuracy"]):
            say(f"new best validation accuracy {result['accuracy']:.4f} at step {at_step}")

    def checkpoint(force=False, data_state=None):
        with dog.phase("checkpoint", step), meter.phase("checkpoint"):
            ckpt.save(step, saved(state), data_iterator=train_iter if data_state is None else None, data_state=data_state,
                      meta={"nonfinite_streak": nonfinite_streak}, force=force)
            if force:
                ckpt.wait()

    # ------------------------------------------------------------------ 6. the loop
    # From here a SIGTERM / SIGINT (or JAX's preemption notice) stops every process at the same check point:
    # before a step's rollout, or after it (the rollout is discarded, never half-applied, and its prompts come
    # first after the resume).
    meter.end("set-up")
    stop = preemption.StopRequest().install()
    w = config.train.watchdog
    dog = watchdog.Watchdog(w.timeout_s, first_timeout_s=w.first_timeout_s, action=w.action)
    ckpt.on_write_error = lambda: (logger.close(), dog.close())  # a failed save stops the run with its logs
    say(f"start-up {time.monotonic() - started:.1f} s; compilation so far: {compiles.summary()} "
        f"({'cache ' + cache_dir if cache_dir else 'persistent cache off'})")
    if step == 0 and config.eval.every > 0:
        run_validation(0)  # the "before" row of the summary table
    first_step, discarded_position = step, None
    while step < total_steps and not stop.reached(f"before step {step + 1}"):
        with meter.phase("distillation"):  # data, rollout, update
            position = train_iter.get_state()
            with dog.phase("data", step + 1):
                prompts = next(train_iter).gather_processes()
            rng, sample_rng = jax.random.split(state.rng)
            start = time.perf_counter()
            with dog.phase("rollout", step + 1):
                out = rollouts(state.params, prompts, sample_rng)
                tokens, mask, logprobs = host(out.tokens), host(out.response_mask), host(out.model_logprobs)
            rollout_s = time.perf_counter() - start
            if stop.reached(f"after the rollout of step {step + 1}"):
                discarded_position = position
                break
            start = time.perf_counter()
            batch = train_batch_lib.build_train_batch(prompts, tokens, mask, num_rollouts, model_cfg,
                                                      sampler_logprobs=logprobs)
            with dog.phase("update", step + 1):
                state, metrics = train_step(state, teacher_params, train_batch_lib.shard_batch(batch, mesh), rng)
                metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
            update_s = time.perf_counter() - start
            if step == first_step:
                say(f"first step {rollout_s + update_s:.1f} s (rollout {rollout_s:.1f} s, update {update_s:.1f} s); "
                    f"compilation so far: {compiles.summary()}")
            step += 1
            seq_tokens = int(batch.attention_mask.sum())
            flops = (metrics_lib.rollout_flops(n_student, int(prompts.attention_mask.sum()), int(mask.sum())) +
                     metrics_lib.update_flops(n_student, n_teacher, seq_tokens, teacher_views))
            logger.log_train(step, metrics, rollout_s=rollout_s, update_s=update_s, tokens=seq_tokens, flops=flops,
                             num_devices=jax.device_count(), peak_tflops_per_device=peak,
                             extra=train_iter.counters.as_dict())  # bad records skipped (counted, logged once)
            nonfinite_streak = nonfinite_streak + 1 if metrics["skipped"] else 0
            if nonfinite_streak >= config.train.max_nonfinite_steps:
                checkpoint(force=True)
                logger.close()
                raise NonFiniteError(
                    f"stopping at step {step}: {nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                    f"(last loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); their updates were skipped, so "
                    f"the checkpoint {os.path.join(workdir, ckpt_lib.STATE_DIR, str(step))} holds the params of the "
                    f"last good step {step - nonfinite_streak}. Check the data and lower config.optim.lr, then rerun "
                    "to resume.")
        if config.eval.every > 0 and (step % config.eval.every == 0 or step == total_steps):
            run_validation(step)
        checkpoint(force=step == total_steps)
    if stop.stopped_at is not None:
        # Every process saves the state of the step reached and waits until Orbax has committed it; a repeated
        # signal meanwhile is only reported.
        saving = time.monotonic()
        say(f"stopping {stop.stopped_at}: saving the checkpoint of step {step} (a repeated signal does not cut it off)")
        checkpoint(force=True, data_state=discarded_position)
        say(stop.report(os.path.join(workdir, ckpt_lib.STATE_DIR, str(step)), time.monotonic() - saving) +
            f"; compilation over the run: {compiles.summary()}. Rerun the same command to resume.")
    stop.uninstall()
    dog.close()
    logger.close()
    if stop.stopped_at is None:
        # ------------------------------------------------------------------ 7. export
        ckpt.wait()
        with meter.phase("export"):
            ckpt.export(state.params, state.graphdef, tokenizer, final=config.export.final, best=config.export.best)
        say(metrics_lib.run_report(workdir, ckpt.best_info) + f"\n{train_iter.counters.summary()}"
            f"\ncompilation over the run: {compiles.summary()}")
        say("\n" + meter.table())
        if primary():
            meter.write_json(os.path.join(workdir, PHASES_FILE))
    ckpt.close()
    meter.close()
    return RunResult(workdir=workdir, step=step, stopped_at=stop.stopped_at, best=ckpt.best_info)


def _models(config, tokenizer, mesh, meter):
    """(teacher, student): the frozen teacher in config.model.dtype; the student's params in float32 (the AdamW
    master copy) with config.model.dtype matmuls."""
    dtype = jnp.dtype(config.model.dtype)
    with meter.phase("teacher SFT" if config.teacher.init == "sft" else "teacher load"):
        if config.teacher.init == "sft":
            teacher = sft.demo_model(config, "teacher", tokenizer, mesh)
        else:
            teacher = load_lib.load_model(config.model, config.teacher.hf_path, mesh, dtype=dtype)
    with meter.phase("student warm-up" if config.student.init == "sft" else "student load"):
        if config.student.init == "hf":
            student = load_lib.load_model(config.model, config.student.hf_path, mesh, dtype=jnp.float32,
                                          compute_dtype=dtype)
        elif config.student.init == "sft":
            student = sft.demo_model(config, "student", tokenizer, mesh)
        else:
            student = load_lib.tiny_model(config.model, config.student.tiny, compute_dtype=dtype, seed=config.seed,
                                          tokenizer=tokenizer)
    return teacher, student


def main(argv=None) -> None:
    """`python -m vaopd_jax.train --config FILE[:ARG] [--config.a.b=VALUE ...]`: every problem of the command
    line and the config at once (one line each), before any compute or file is written; exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        mesh_lib.maybe_initialize_distributed()
        config, _ = config_lib.load_command_line(sys.argv[1:] if argv is None else argv, usage=__doc__,
                                                 device_count=jax.device_count(), process_count=jax.process_count())
        run(config)
    except config_lib.ConfigError as err:
        sys.exit(str(err))
    finally:
        grading.shutdown()


if __name__ == "__main__":
    main()
