r"""python -m vaopd_jax.train --config configs/demo.py [--config.field=value ...]

The VA-OPD training loop, one straight `main`:

  1. config, processes, mesh      validate before any compute; jax.distributed; the device mesh
  2. tokenizer, teacher, student  Hugging Face checkpoints (or the demo's SFT / random tiny models)
  3. data and samplers            PromptBatch iterators (train, validation); a Sampler for each, built once
  4. optimizer, state, step       AdamW; the student's train state; the frozen teacher; the fused jitted step
  5. checkpoints and logs         resume from the latest complete checkpoint (any mesh, any device count);
                                  tensorboard + metrics.jsonl
  6. the loop                     prompts -> rollouts (Sampler) -> TrainBatch -> step -> metrics, with
                                  periodic validation (sampling + grading) and the best checkpoint; a
                                  SIGTERM/SIGINT stops every process at one check point, saves and exits 0;
                                  a phase past train.watchdog's limit is reported
  7. export                       the final and best students in Hugging Face format, the summary table

Multi-host: run the same command on every host; jax.distributed is initialised
from the environment. Each process loads its slice of the data; the slices are
exchanged once per step (`PromptBatch.gather_processes`) so every process holds
the same global batch (the sampler and step take global arrays); only process 0
writes logs and exports.

Start-up (to the first step) and the first step's time are printed, with the
count of XLA programs compiled and loaded from the persistent compilation cache
(train.compilation_cache_dir): a restarted run compiles nothing.

Outputs under --config.workdir: checkpoints/ (Orbax), checkpoints_best/, tb/
(tensorboard), metrics.jsonl, export/final and export/best (Hugging Face), phases.json
(wall time and peak resident memory of each phase, also printed at the end).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time

STARTED = time.monotonic()  # start-up is timed from here: before JAX, the models and the data load

from vaopd_jax.runtime import host_malloc

if __name__ == "__main__":
    # Before JAX allocates anything: XLA's per-step temporaries come in as 2 MiB pages, not 4 KiB ones (on
    # CPU the page faults took 40 % of the demo's CPU time). Re-executes this command once (host_malloc.py).
    host_malloc.reexec_with_hugepages()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from vaopd_jax import config as config_lib
from vaopd_jax import sft
from vaopd_jax.data import splits, synthetic
from vaopd_jax.data import tokenizer as tokenizer_lib
from vaopd_jax.distill import objective
from vaopd_jax.distill import step as step_lib
from vaopd_jax.eval import grading, validation
from vaopd_jax.models import compat
from vaopd_jax.models import load as load_lib
from vaopd_jax.models import qwen3_vl
from vaopd_jax.parallel import backend as backend_lib
from vaopd_jax.parallel import mesh as mesh_lib
from vaopd_jax.parallel.multihost import host, primary, say, sync
from vaopd_jax.rollout import sampler
from vaopd_jax.runtime import checkpoint as ckpt_lib
from vaopd_jax.runtime import compile_cache, phases, preemption, watchdog
from vaopd_jax.runtime import metrics as metrics_lib

log = logging.getLogger("vaopd_jax.train")
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file, e.g. configs/demo.py[:method=opd]",
                                          lock_config=True)


PHASES_FILE = "phases.json"  # wall time and peak RSS per phase (phases.PhaseMeter), read by bench.demo


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` consecutive skipped (non-finite) steps."""


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO

    # ------------------------------------------------------------------ 1. config, processes, mesh
    config = _CONFIG.value
    config_lib.validate(config)  # before any compute: names the field, the value and the allowed range
    # Wall time and peak RSS per phase (start-up, the demo's SFT phases, distillation, validation, export):
    # printed at the end and written to <workdir>/phases.json for `python -m vaopd_jax.bench.demo`.
    meter = phases.PhaseMeter()
    meter.begin("start-up")  # JAX, processes, mesh, tokenizer
    # Before anything compiles: JAX decides once per process whether the persistent cache is used.
    cache_dir = compile_cache.enable(config.train.compilation_cache_dir)
    compiles = compile_cache.CompileCounter()
    mesh_lib.maybe_initialize_distributed()
    if config.data.prompts_per_step % jax.process_count():
        raise config_lib.ConfigError(
            f"config.data.prompts_per_step = {config.data.prompts_per_step}: must be divisible by the number of "
            f"processes ({jax.process_count()})")
    # Names the backend and device kind; warns when a GPU/TPU config (bf16, chunked attention, a multi-device
    # mesh) lands on CPU, before make_mesh can fail on the device count.
    devices_line, backend_warnings = backend_lib.startup_report(
        backend_lib.backend_info(), dtype=config.model.dtype, attention_impl=config.model.attention_impl,
        mesh_shape=(config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor),
        field_prefix="config.model.")
    for warning in backend_warnings:
        log.warning(warning)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, expert=config.mesh.expert)
    if config.teacher.init == "hf" and mesh.shape["expert"] > 1:  # mesh.expert = -1 is known only now
        problem = config_lib.expert_axis_problem(config.teacher.hf_path, mesh.shape["expert"])
        if problem:
            raise config_lib.ConfigError(f"config.mesh.expert = {config.mesh.expert} (mesh {dict(mesh.shape)}): "
                                         f"{problem}")
    workdir = config.workdir
    if primary():
        os.makedirs(workdir, exist_ok=True)
    say(f"{devices_line}; mesh {dict(mesh.shape)}; workdir {workdir}")

    # ------------------------------------------------------------------ 2. tokenizer, teacher, student
    tokenizer = tokenizer_lib.load_tokenizer(
        config.tokenizer_path or (config.student.hf_path if config.student.init == "hf" else None))
    if config.data.get("task_vocabulary", False):  # the demo: tiny models over the synthetic task's tokens
        tokenizer = synthetic.task_tokenizer(tokenizer)
        say(f"task vocabulary: the tiny models' vocabulary is the synthetic task's {len(tokenizer)} Qwen tokens")
    # The frozen teacher in config.model.dtype; the student's params in float32 (the AdamW master copy) with
    # config.model.dtype matmuls.
    dtype = jnp.dtype(config.model.dtype)
    meter.end("start-up")
    with meter.phase("teacher SFT" if config.teacher.init == "sft" else "teacher load"):
        if config.teacher.init == "sft":
            teacher = sft.demo_model(config, "teacher", tokenizer, mesh)
        else:
            teacher = load_lib.load_model(config, config.teacher.hf_path, mesh, dtype=dtype)
    with meter.phase("student warm-up" if config.student.init == "sft" else "student load"):
        if config.student.init == "hf":
            student = load_lib.load_model(config, config.student.hf_path, mesh, dtype=jnp.float32,
                                          compute_dtype=dtype)
        elif config.student.init == "sft":
            student = sft.demo_model(config, "student", tokenizer, mesh)
        else:
            student = load_lib.tiny_model(config, config.student.tiny, compute_dtype=dtype, seed=config.seed,
                                          tokenizer=tokenizer)
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
    r, e = config.rollout, config.eval
    # Built once (graph, settings, mesh), called with the train state's params: K rollouts per prompt.
    ends = dict(eos_token_ids=tokenizer_lib.end_token_ids(tokenizer))  # the compact ids with a task vocabulary
    rollouts = sampler.Sampler(student, max_new_tokens=r.max_new_tokens, num_samples=r.num_rollouts,
                               temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                               valid_vocab_size=valid_vocab_size, mesh=mesh, **ends)
    # Greedy samples of one prompt are all the same: avg@k of k copies is the score of one, at 1/k of the cost
    # (the demo's greedy validation sampled and scored 8 copies, ~5 GB of full-vocabulary log-probs at once).
    val_rollouts = sampler.Sampler(student, max_new_tokens=e.max_new_tokens,
                                   num_samples=1 if e.temperature == 0 else e.num_samples,
                                   temperature=e.temperature, top_p=e.top_p, valid_vocab_size=valid_vocab_size,
                                   mesh=mesh, **ends)

    # ------------------------------------------------------------------ 4. optimizer, state, step
    total_steps = splits.train_steps(config)  # the release's count: epochs x full batches per epoch
    o = config.optim
    optimizer = step_lib.make_optimizer(o.lr, total_steps, o.warmup_fraction, o.b1, o.b2, o.weight_decay,
                                        o.clip_norm)
    state = step_lib.create_train_state(student, optimizer, jax.random.key(config.seed), remat=config.model.remat,
                                        mesh=mesh)
    teacher_graphdef, teacher_params = step_lib.split_teacher(teacher, mesh=mesh)
    del student, teacher
    k = config.rollout.num_rollouts
    step_config = step_lib.StepConfig(num_rollouts=k, objective=config_lib.objective_config(config),
                                      kl_chunk_size=config.model.kl_chunk_size, valid_vocab_size=valid_vocab_size,
                                      micro_batch_rollouts=config.train.micro_batch_rollouts or None,
                                      critical_token_ids=synthetic.critical_token_ids(tokenizer)
                                      if config.data.source == "synthetic" else ())
    train_step = step_lib.make_train_step(step_config, teacher_graphdef, optimizer, mesh=mesh,
                                          state_sharding=step_lib.train_state_sharding(state))

    # ------------------------------------------------------------------ 5. checkpoints and logs
    ckpt = ckpt_lib.CheckpointManager(workdir, keep=config.train.keep_checkpoints,
                                      save_every=config.train.checkpoint_every,
                                      async_save=config.train.async_checkpoint, run=run_signature,
                                      resume_across_changes=config.train.resume_across_changes)
    saved = lambda s: {"params": s.params, "opt_state": s.opt_state, "step": s.step, "rng": s.rng}  # noqa: E731
    restored = ckpt.restore_latest(ckpt_lib.abstract_like(saved(state)), data_iterator=train_iter)
    nonfinite_streak = 0
    if restored is not None:
        state = state.replace(**restored.state)
        nonfinite_streak = int(restored.meta.get("nonfinite_streak", 0))
        say(f"resumed from {os.path.join(workdir, ckpt_lib.STATE_DIR, str(restored.step))}" + (
            f" (written by {restored.topology['processes']} process(es) with {restored.topology['devices']} devices, "
            f"restored onto this mesh {dict(mesh.shape)})" if restored.topology not in (None, ckpt_lib.topology())
            else ""))
        if restored.data_note:
            say(restored.data_note)
    step = int(host(state.step))
    logger = metrics_lib.MetricsLogger(workdir, total_steps=total_steps, is_primary=primary(), resume_step=step,
                                       console_every=config.train.log_every)
    peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops_per_device)
    teacher_views = 1 if config.method == "opd" else 2

    def run_validation(at_step):
        result = validate(state, val_batches, val_rollouts, config, tokenizer, mesh, at_step)
        logger.log_val(at_step, result)
        if ckpt.maybe_save_best(at_step, state.params, result["accuracy"]):
            say(f"new best validation accuracy {result['accuracy']:.4f} at step {at_step}")

    # ------------------------------------------------------------------ 6. the loop
    # From here a SIGTERM / SIGINT (or JAX's preemption notice) stops every process at the same check point:
    # before a step's rollout, or after it (the rollout is discarded, never half-applied, and its prompts come
    # first after the resume). A phase running past train.watchdog's limit is reported.
    meter.end("set-up")
    stop = preemption.StopRequest().install()
    w = config.train.watchdog
    dog = watchdog.Watchdog(w.timeout_s, first_timeout_s=w.first_timeout_s, action=w.action)
    ckpt.on_write_error = lambda: (logger.close(), dog.close())  # a failed save stops the run with its logs
    say(f"start-up {time.monotonic() - STARTED:.1f} s; compilation so far: {compiles.summary()} "
        f"({'cache ' + cache_dir if cache_dir else 'persistent cache off'})")
    if step == 0 and config.eval.every > 0:
        with dog.phase("validation", 0), meter.phase("validation"):
            run_validation(0)  # the "before" row of the summary table
    first_step, discarded_position = step, None
    while step < total_steps:
        if stop.reached(f"before step {step + 1}"):
            break
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
            train_batch = step_lib.build_train_batch(prompts, tokens, mask, k, model_cfg, sampler_logprobs=logprobs)
            with dog.phase("update", step + 1):
                state, metrics = train_step(state, teacher_params, step_lib.shard_batch(train_batch, mesh), rng)
                metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
            update_s = time.perf_counter() - start
            if step == first_step:
                say(f"first step {rollout_s + update_s:.1f} s (rollout {rollout_s:.1f} s, update {update_s:.1f} s); "
                    f"compilation so far: {compiles.summary()}")
            step += 1
            seq_tokens = int(train_batch.attention_mask.sum())
            flops = (metrics_lib.rollout_flops(n_student, int(prompts.attention_mask.sum()), int(mask.sum())) +
                     metrics_lib.update_flops(n_student, n_teacher, seq_tokens, teacher_views))
            # Bad records skipped by this process's pipeline (counted, logged once per id by the pipeline).
            logger.log_train(step, metrics, rollout_s=rollout_s, update_s=update_s, tokens=seq_tokens, flops=flops,
                             num_devices=jax.device_count(), peak_tflops_per_device=peak,
                             extra=train_iter.counters.as_dict())
            nonfinite_streak = nonfinite_streak + 1 if metrics["skipped"] else 0
            if nonfinite_streak >= config.train.max_nonfinite_steps:
                ckpt.save(step, saved(state), data_iterator=train_iter, meta={"nonfinite_streak": nonfinite_streak},
                          force=True)
                ckpt.wait()
                logger.close()
                raise NonFiniteError(
                    f"stopping at step {step}: {nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                    f"(last loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); their updates were skipped, so "
                    f"the checkpoint {os.path.join(workdir, ckpt_lib.STATE_DIR, str(step))} holds the params of the "
                    f"last good step {step - nonfinite_streak}. Check the data and lower config.optim.lr, then rerun "
                    "to resume.")
        if config.eval.every > 0 and (step % config.eval.every == 0 or step == total_steps):
            with dog.phase("validation", step), meter.phase("validation"):
                run_validation(step)
        with dog.phase("checkpoint", step), meter.phase("checkpoint"):
            ckpt.save(step, saved(state), data_iterator=train_iter, meta={"nonfinite_streak": nonfinite_streak},
                      force=step == total_steps)
    if stop.stopped_at is not None:
        # Every process saves the state of the step reached and waits until Orbax has committed it (renamed
        # from its temporary directory); a repeated signal meanwhile is only reported.
        saving = time.monotonic()
        say(f"stopping {stop.stopped_at}: saving the checkpoint of step {step} (a repeated signal does not cut it off)")
        with dog.phase("checkpoint", step):
            ckpt.save(step, saved(state), data_iterator=train_iter if discarded_position is None else None,
                      data_state=discarded_position, meta={"nonfinite_streak": nonfinite_streak}, force=True)
            ckpt.wait()
        logger.close()
        ckpt.close()
        dog.close()
        since = stop.seconds_since_signal()
        say(f"stopped {stop.stopped_at}" + (f" ({stop.signal_name})" if stop.signal_name else "") +
            f": the checkpoint {os.path.join(workdir, ckpt_lib.STATE_DIR, str(step))} is complete (saved in "
            f"{time.monotonic() - saving:.1f} s" + (f", {since:.1f} s after the signal" if since is not None else "")
            + f"); compilation over the run: {compiles.summary()}. Rerun the same command to resume.")
        stop.uninstall()
        grading.shutdown()
        return
    stop.uninstall()
    dog.close()
    ckpt.wait()
    logger.close()

    # ------------------------------------------------------------------ 7. export
    with meter.phase("export"):
        export(config, state, ckpt, tokenizer, workdir)
    say("\n" + summary_table(os.path.join(workdir, "metrics.jsonl")))
    say(train_iter.counters.summary())  # skipped and converted records by kind (also in tensorboard, data/*)
    say(f"\ntensorboard logs: tensorboard --logdir {os.path.join(workdir, 'tb')}\n"
        f"metrics:          {os.path.join(workdir, 'metrics.jsonl')}\n"
        f"student (HF):     {os.path.join(workdir, 'export', 'final')}"
        + (f"\nbest student:     {os.path.join(workdir, 'export', 'best')} (step {ckpt.best_info['step']}, "
           f"validation accuracy {ckpt.best_info['accuracy']:.4f})" if ckpt.best_info else "")
        + f"\ncompilation over the run: {compiles.summary()}")
    ckpt.close()
    grading.shutdown()
    say("\n" + meter.table())
    if primary():
        meter.write_json(os.path.join(workdir, PHASES_FILE))
    meter.close()


# ----------------------------------------------------------------------------- validation
@functools.partial(jax.jit, static_argnames=("valid_vocab_size", "chunk_size"))
def _va_sums(params, batch: step_lib.TrainBatch, graphdef, valid_vocab_size, chunk_size):
    """Sum of the student's own VA, max(0, log p_S(y|v) - log p_S(y|v~)), over valid tokens, and their count."""
    logp_orig, logp_pix = step_lib.two_view_logprobs(nnx.merge(graphdef, params), batch,
                                                     valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)
    va = objective.visual_advantage(logp_orig, logp_pix, batch.response_mask)
    return (va * batch.response_mask).sum(), batch.response_mask.sum()


def validate(state, val_batches, val_rollouts: sampler.Sampler, config, tokenizer, mesh, step) -> dict:
    """Validation accuracy (overall and per question kind) and mean student VA on the held-out set.

    Every process holds the whole (small) validation set, samples it with the
    same keys and grades it, so the results agree without a gather.
    """
    model_cfg = val_rollouts.config
    counts: dict[str, list[int]] = {}  # kind -> [correct, total]
    va_sum = va_count = 0.0
    valid_vocab_size = tokenizer_lib.valid_vocab_size(tokenizer, model_cfg.text.vocab_size)
    for i, batch in enumerate(val_batches):
        rng = jax.random.fold_in(jax.random.key(config.seed + 7), step * 1000 + i)
        out = val_rollouts(state.params, batch, rng)
        tokens, mask = host(out.tokens), host(out.response_mask)
        texts = tokenizer.batch_decode([t[m > 0] for t, m in zip(tokens, mask)], skip_special_tokens=True)
        golds = [str(a) for a in np.repeat(batch.answer, val_rollouts.num_samples)]
        kinds = np.repeat(batch.kind, val_rollouts.num_samples)
        # the release's checkpoint-selection grading: earliest committed answer (else the raw text), mathruler
        for ok, kind in zip(validation.grade_validation_responses(texts, golds), kinds):
            tally = counts.setdefault(str(kind) or "all", [0, 0])
            tally[0] += int(ok)
            tally[1] += 1
        train_batch = step_lib.build_train_batch(batch, tokens, mask, val_rollouts.num_samples, model_cfg)
        total, count = _va_sums(state.params, step_lib.shard_batch(train_batch, mesh), state.graphdef,
                                valid_vocab_size, config.model.kl_chunk_size)
        va_sum, va_count = va_sum + float(total), va_count + float(count)
    result = {"accuracy": sum(c for c, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1),
              "student_va_mean": va_sum / max(va_count, 1.0)}
    if len(counts) > 1:
        result.update({f"accuracy_{kind}": c / n for kind, (c, n) in sorted(counts.items())})
    return result


# ----------------------------------------------------------------------------- export and summary
def export(config, state, ckpt, tokenizer, workdir) -> None:
    """Final and best students in Hugging Face format (+ tokenizer files), written by process 0."""
    targets = []
    if config.export.final:
        targets.append(("final", state.params))
    if config.export.best and ckpt.best_info is not None:
        targets.append(("best", ckpt.restore_best(ckpt_lib.abstract_like(state.params))))
    for name, params in targets:
        path = os.path.join(workdir, "export", name)
        qwen3_vl.save_hf_checkpoint(nnx.merge(state.graphdef, params), path)
        if primary():
            tokenizer.save_pretrained(path)
    sync("exported")


def summary_table(jsonl_path: str) -> str:
    """Before/after table from the first and last validation records of metrics.jsonl."""
    vals = metrics_lib.read_jsonl(jsonl_path, kind="val")
    if not vals:
        return "(no validation ran: set --config.eval.every > 0)"
    first, last = vals[0], vals[-1]
    rows = [("accuracy, fine-detail questions", "val/accuracy_fine"),
            ("accuracy, coarse questions", "val/accuracy_coarse"), ("accuracy, all", "val/accuracy"),
            ("mean student VA", "val/student_va_mean")]
    lines = [f"{'':34s}{'before (step %d)' % first['step']:>20s}{'after (step %d)' % last['step']:>20s}"]
    for name, key in rows:
        if key in first:
            lines.append(f"{name:34s}{first[key]:>20.3f}{last.get(key, float('nan')):>20.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app.run(main)
