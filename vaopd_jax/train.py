r"""python -m vaopd_jax.train --config configs/demo.py [--config.field=value ...]

The VA-OPD training loop, top to bottom: validate the config -> multi-host init
and mesh -> tokenizer -> frozen teacher (its Hugging Face directory, or the demo
teacher taught by SFT) -> student (Hugging Face directory or random tiny init)
-> data -> optimizer and train state -> resume from the latest complete
checkpoint -> loop {prompts -> student rollouts (sampler) -> TrainBatch -> one
fused jitted step -> metrics} with periodic validation (sampling + grading), the
best checkpoint by validation accuracy, and the final and best students exported
in Hugging Face format.

Multi-host: run the same command on every host; jax.distributed is initialised
from the environment. Each process loads its slice of the data; the slices are
exchanged once per step so every process holds the same global batch (the
sampler and step take global arrays); only process 0 writes logs and exports.

Outputs under --config.workdir: checkpoints/ (Orbax), checkpoints_best/, tb/
(tensorboard), metrics.jsonl, export/final and export/best (Hugging Face).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from vaopd_jax import checkpoint as ckpt_lib
from vaopd_jax import config as config_lib
from vaopd_jax import metrics as metrics_lib
from vaopd_jax import sft
from vaopd_jax.eval import grading
from vaopd_jax.data import pipeline, sources, synthetic
from vaopd_jax.data import tokenizer as tokenizer_lib
from vaopd_jax.distill import objective
from vaopd_jax.distill import step as step_lib
from vaopd_jax.models import qwen3_vl
from vaopd_jax.parallel import backend as backend_lib
from vaopd_jax.parallel import mesh as mesh_lib
from vaopd_jax.parallel.multihost import host, primary, sync, to_global
from vaopd_jax.rollout import sampler

log = logging.getLogger("vaopd_jax.train")
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file, e.g. configs/demo.py[:method=opd]",
                                          lock_config=True)
SFT_DONE = "SFT_DONE"


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` consecutive skipped (non-finite) steps."""


def say(message: str) -> None:
    if primary():
        print(message, flush=True)


# ----------------------------------------------------------------------------- models
def demo_sft_model(config, role: str, tokenizer, mesh) -> qwen3_vl.Qwen3VL:
    """A tiny demo model taught the synthetic task by SFT once, then reloaded from its HF directory.

    role 'teacher': ``config.teacher.sft`` (the whole task); role 'student':
    ``config.student.sft``, a warm-up standing in for pre-training (by default on
    the pixelated views: the student learns the questions, the answer words and the
    coarse cues, so the fine-detail skill must come from distillation).
    """
    node = config.teacher.sft if role == "teacher" else config.student.sft
    spec = config.teacher.sft.tiny if role == "teacher" else config.student.tiny
    out_dir = node.output_dir or os.path.join(config.workdir, f"{role}_sft")
    # Loaded like an HF teacher / student would be: the teacher in config.model.dtype; the student's params
    # in float32 (the AdamW master copy) with config.model.dtype matmuls.
    dtype = jnp.dtype(config.model.dtype)
    dtypes = {"dtype": dtype} if role == "teacher" else {"dtype": jnp.float32, "compute_dtype": dtype}
    if os.path.exists(os.path.join(out_dir, SFT_DONE)):
        say(f"{role}: reusing the SFT {role} in {out_dir}")
        return load_model(config, out_dir, mesh, **dtypes)
    cfg = config_lib.model_config_from_spec(spec)
    model = qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(config.seed + (1 if role == "teacher" else 0)))
    say(f"{role}: SFT of a tiny {role} ({count_params(model):,} params) on the synthetic task "
        f"(fine-question share {node.fine_fraction}, {node.images.replace('_', ' ')} images), "
        f"{node.steps} steps -> {out_dir}")
    data = pipeline_for(config, tokenizer, cfg, split=f"{role}_sft", batch_size=node.batch_size,
                        fine_fraction=node.fine_fraction)
    batches = (sft.build_sft_batch(b.gather_processes().with_view(node.images), tokenizer) for b in data)
    model, _ = sft.train_sft(model, batches, steps=node.steps, lr=node.lr, label=f"{role} SFT")
    qwen3_vl.save_hf_checkpoint(model, out_dir)
    if primary():
        tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, SFT_DONE), "w") as f:
            f.write("ok\n")
    sync(f"{role}_sft_saved")
    return load_model(config, out_dir, mesh, **dtypes)


def runtime_options(config) -> dict:
    """Model-config fields that the run chooses, not the checkpoint (attention kernel and its chunking)."""
    return {"attention_impl": config.model.attention_impl, "attention_chunk_size": config.model.attention_chunk_size}


def load_model(config, path: str, mesh, *, dtype, compute_dtype=None) -> qwen3_vl.Qwen3VL:
    """A Hugging Face checkpoint with this run's runtime options (``config.model.attention_impl`` ...)."""
    cfg = qwen3_vl.Qwen3VLConfig.from_hf(path).replace(**runtime_options(config))
    return qwen3_vl.load_hf_checkpoint(path, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype, config=cfg)


def count_params(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ----------------------------------------------------------------------------- data
# Disjoint synthetic record sets, fixed (not config.seed) so that every run validates on the same problems.
SYNTHETIC_SEEDS = {"teacher_sft": 1, "train": 2, "val": 3, "student_sft": 4}


class _Subset:
    """The first ``n`` records of a random-access source (picklable for grain workers)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.source[int(index)]

    def __repr__(self) -> str:
        return f"_Subset({self.source!r}, n={self.n})"


def data_source(config, split: str, fine_fraction: float = 0.5):
    """The raw-record source of a split: 'train' / 'val' / 'teacher_sft' / 'student_sft' (demo warm-ups)."""
    d = config.data
    name = d.val_source if split == "val" else d.source
    if name == "synthetic":
        size = config.eval.num_problems if split == "val" else d.synthetic_train_size
        return synthetic.SyntheticSource(size, seed=SYNTHETIC_SEEDS[split], image_size=d.image_size,
                                         fine_fraction=fine_fraction)
    if split == "val":
        source = (sources.geometry3k_validation_source(d.val_path) if name == "geometry3k"
                  else sources.ViRL39KSource(d.val_path))
        return _Subset(source, config.eval.num_problems)
    return sources.Geometry3KSource(d.train_path, split="train") if name == "geometry3k" else \
        sources.ViRL39KSource(d.train_path)


def pipeline_for(config, tokenizer, model_config, *, split: str, batch_size: int, fine_fraction: float = 0.5):
    """A grain iterator of `PromptBatch`es: training splits are shuffled, repeated and sharded by process
    (``batch_size`` global prompts, ``batch_size / processes`` each); validation is read whole by every
    process, once, in order."""
    d = config.data
    train = split != "val"
    if train and batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"{split} batch size {batch_size} must be divisible by the number of processes {jax.process_count()}")
    pcfg = pipeline.PipelineConfig(
        batch_size=batch_size // jax.process_count() if train else batch_size, seed=config.seed, shuffle=train,
        num_epochs=None if train else 1, drop_remainder=train, prompt_buckets=tuple(d.prompt_buckets),
        prompt_patch_buckets=tuple(d.prompt_patch_buckets), min_pixels=d.min_pixels, max_pixels=d.max_pixels,
        pixelation_ratio=config.va.pixelate_ratio, num_workers=d.num_workers if train else 0,
        shard_index=None if train else 0, shard_count=None if train else 1)
    return pipeline.make_iterator(data_source(config, split, fine_fraction), pcfg, tokenizer=tokenizer,
                                  model_config=model_config)


# ----------------------------------------------------------------------------- rollouts and validation
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
    e = config.eval
    counts: dict[str, list[int]] = {}  # kind -> [correct, total]
    va_sum = va_count = 0.0
    valid_vocab_size = tokenizer_lib.valid_vocab_size(tokenizer, model_cfg.text.vocab_size)
    for i, batch in enumerate(val_batches):
        rng = jax.random.fold_in(jax.random.key(config.seed + 7), step * 1000 + i)
        out = val_rollouts(state.params, batch, rng)
        tokens, mask = host(out.tokens), host(out.response_mask)
        texts = tokenizer.batch_decode([t[m > 0] for t, m in zip(tokens, mask)], skip_special_tokens=True)
        golds = [str(a) for a in np.repeat(batch.answer, e.num_samples)]
        kinds = np.repeat(batch.kind, e.num_samples)
        for ok, kind in zip(grading.grade_responses(texts, golds), kinds):
            tally = counts.setdefault(str(kind) or "all", [0, 0])
            tally[0] += int(ok)
            tally[1] += 1
        train_batch = step_lib.build_train_batch(batch, tokens, mask, e.num_samples, model_cfg)
        total, count = _va_sums(state.params, step_lib.shard_batch(train_batch, mesh), state.graphdef,
                                valid_vocab_size, config.model.kl_chunk_size)
        va_sum, va_count = va_sum + float(total), va_count + float(count)
    result = {"accuracy": sum(c for c, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1),
              "student_va_mean": va_sum / max(va_count, 1.0)}
    if len(counts) > 1:
        result.update({f"accuracy_{kind}": c / n for kind, (c, n) in sorted(counts.items())})
    return result


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


# ----------------------------------------------------------------------------- main
def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    config_lib.validate(config)  # before any compute: names the field, the value and the allowed range
    mesh_lib.maybe_initialize_distributed()
    if config.data.prompts_per_step % jax.process_count():
        raise config_lib.ConfigError(
            f"config.data.prompts_per_step = {config.data.prompts_per_step}: must be divisible by the number of "
            f"processes ({jax.process_count()})")
    # Names the backend and device kind; warns when a GPU/TPU config (bf16, chunked attention, a multi-device
    # mesh) lands on CPU, before make_mesh can fail on the device count.
    devices_line, backend_warnings = backend_lib.startup_report(
        backend_lib.backend_info(), dtype=config.model.dtype, attention_impl=config.model.attention_impl,
        mesh_shape=(config.mesh.data, config.mesh.fsdp, config.mesh.tensor), field_prefix="config.model.")
    for warning in backend_warnings:
        log.warning(warning)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    workdir = config.workdir
    if primary():
        os.makedirs(workdir, exist_ok=True)
    say(f"{devices_line}; mesh {dict(mesh.shape)}; workdir {workdir}")

    if config.tokenizer_path:
        tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer_path)
    elif config.student.init == "hf":
        tokenizer = tokenizer_lib.load_tokenizer(config.student.hf_path)
    else:
        tokenizer = tokenizer_lib.load_tokenizer(None)

    dtype = jnp.dtype(config.model.dtype)
    if config.teacher.sft.enabled:
        teacher = demo_sft_model(config, "teacher", tokenizer, mesh)
    else:
        teacher = load_model(config, config.teacher.hf_path, mesh, dtype=dtype)
    # Student params stay float32 (the AdamW master copy); matmuls run in config.model.dtype.
    if config.student.init == "hf":
        student = load_model(config, config.student.hf_path, mesh, dtype=jnp.float32, compute_dtype=dtype)
    elif config.student.init == "sft":
        student = demo_sft_model(config, "student", tokenizer, mesh)
    else:
        student = qwen3_vl.Qwen3VL(config_lib.model_config_from_spec(config.student.tiny).replace(
            **runtime_options(config)), param_dtype=jnp.float32, compute_dtype=dtype, rngs=nnx.Rngs(config.seed))
    if student.config.text.vocab_size != teacher.config.text.vocab_size:
        raise config_lib.ConfigError(
            f"student vocabulary size {student.config.text.vocab_size} != teacher vocabulary size "
            f"{teacher.config.text.vocab_size}")
    n_student, n_teacher = count_params(student), count_params(teacher)
    model_cfg = student.config
    say(f"student {n_student:,} params, teacher {n_teacher:,} params (frozen), method {config.method}")

    train_iter = pipeline_for(config, tokenizer, model_cfg, split="train", batch_size=config.data.prompts_per_step,
                              fine_fraction=config.data.synthetic_fine_fraction)
    val_batches = [b.without_filler() for b in pipeline_for(config, tokenizer, model_cfg, split="val",
                                                            batch_size=config.eval.batch_size)]
    # The samplers are built once (graph, settings, mesh) and called with the train state's params.
    valid_vocab_size = tokenizer_lib.valid_vocab_size(tokenizer, model_cfg.text.vocab_size)
    r, e = config.rollout, config.eval
    rollouts = sampler.Sampler(student, max_new_tokens=r.max_new_tokens, num_samples=r.num_rollouts,
                               temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                               valid_vocab_size=valid_vocab_size, mesh=mesh)
    val_rollouts = sampler.Sampler(student, max_new_tokens=e.max_new_tokens, num_samples=e.num_samples,
                                   temperature=e.temperature, top_p=e.top_p, valid_vocab_size=valid_vocab_size,
                                   mesh=mesh)
    total_steps = config.train.num_steps
    if total_steps < 0:
        total_steps = math.ceil(config.data.num_epochs * len(data_source(config, "train")) /
                                config.data.prompts_per_step)

    o = config.optim
    optimizer = step_lib.make_optimizer(o.lr, total_steps, o.warmup_fraction, o.b1, o.b2, o.weight_decay,
                                        o.clip_norm)
    if jax.process_count() == 1:
        state = step_lib.create_train_state(student, optimizer, jax.random.key(config.seed),
                                            remat=config.model.remat, mesh=mesh)
    else:
        # JAX only device_puts process-local arrays onto addressable devices, so on several processes the
        # params, step and key are made global here (every process holds the same values) and
        # create_train_state keeps their shardings (mesh=None).
        nnx.update(student, to_global(nnx.state(student, nnx.Param),
                                      qwen3_vl.param_shardings(student, mesh)))
        state = step_lib.create_train_state(student, optimizer, jax.random.key(config.seed),
                                            remat=config.model.remat, mesh=None)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(lambda x: x if len(x.sharding.device_set) == mesh.size else to_global(x, replicated),
                             state)  # step, key and optimizer counters were made on one local device
    del student
    teacher_graphdef, teacher_params = step_lib.split_teacher(teacher, mesh=mesh)
    del teacher
    k = config.rollout.num_rollouts
    step_cfg = step_lib.StepConfig(num_rollouts=k, objective=config_lib.objective_config(config),
                                   kl_chunk_size=config.model.kl_chunk_size, valid_vocab_size=valid_vocab_size)
    train_step = step_lib.make_train_step(step_cfg, teacher_graphdef, optimizer, mesh=mesh,
                                          state_sharding=step_lib.train_state_sharding(state))

    ckpt = ckpt_lib.CheckpointManager(workdir, keep=config.train.keep_checkpoints,
                                      save_every=config.train.checkpoint_every,
                                      async_save=config.train.async_checkpoint)
    saved = lambda s: {"params": s.params, "opt_state": s.opt_state, "step": s.step, "rng": s.rng}  # noqa: E731
    restored = ckpt.restore_latest(ckpt_lib.abstract_like(saved(state)), data_iterator=train_iter)
    nonfinite_streak = 0
    if restored is not None:
        state = state.replace(**restored.state)
        nonfinite_streak = int(restored.meta.get("nonfinite_streak", 0))
        say(f"resumed from {os.path.join(workdir, ckpt_lib.STATE_DIR, str(restored.step))}")
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

    if step == 0 and config.eval.every > 0:
        run_validation(0)  # the "before" row of the summary table
    while step < total_steps:
        prompt_batch = next(train_iter).gather_processes()
        rng, sample_rng = jax.random.split(state.rng)
        start = time.perf_counter()
        out = rollouts(state.params, prompt_batch, sample_rng)
        tokens, mask, logprobs = host(out.tokens), host(out.response_mask), host(out.model_logprobs)
        rollout_s = time.perf_counter() - start
        start = time.perf_counter()
        train_batch = step_lib.build_train_batch(prompt_batch, tokens, mask, k, model_cfg, sampler_logprobs=logprobs)
        if 0 < config.train.inject_nonfinite_from_step <= step + 1:
            train_batch = train_batch._replace(pixel_values=np.full_like(train_batch.pixel_values, np.nan))
        state, metrics = train_step(state, teacher_params, step_lib.shard_batch(train_batch, mesh), rng)
        metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
        update_s = time.perf_counter() - start
        step += 1
        seq_tokens = int(train_batch.attention_mask.sum())
        flops = (metrics_lib.rollout_flops(n_student, int(prompt_batch.attention_mask.sum()), int(mask.sum())) +
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
            run_validation(step)
        ckpt.save(step, saved(state), data_iterator=train_iter, meta={"nonfinite_streak": nonfinite_streak},
                  force=step == total_steps)

    ckpt.wait()
    logger.close()
    export(config, state, ckpt, tokenizer, workdir)
    say("\n" + summary_table(os.path.join(workdir, "metrics.jsonl")))
    say(f"\ntensorboard logs: tensorboard --logdir {os.path.join(workdir, 'tb')}\n"
        f"metrics:          {os.path.join(workdir, 'metrics.jsonl')}\n"
        f"student (HF):     {os.path.join(workdir, 'export', 'final')}"
        + (f"\nbest student:     {os.path.join(workdir, 'export', 'best')} (step {ckpt.best_info['step']}, "
           f"validation accuracy {ckpt.best_info['accuracy']:.4f})" if ckpt.best_info else ""))
    ckpt.close()
    grading.shutdown()


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


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app.run(main)
