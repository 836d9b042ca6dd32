"""The fused, jitted train step: teacher scoring, the objective and the optimizer update in one program.

    train_step = make_train_step(StepConfig(num_rollouts=4, objective=ObjectiveConfig(method="va_opd")),
                                 teacher_graphdef, optimizer, mesh=mesh, state_sharding=train_state_sharding(state))
    state, metrics = train_step(state, teacher_params, shard_batch(train_batch, mesh), rng)

It composes three parts, each its own module:
  1. teacher scoring (`distill.teacher`): the frozen teacher on the original view and, when the method uses the
     visual advantage (or `log_visual_advantage` is on), on the pixelated view -> log-probs -> VA (Eq. 2);
  2. the objective (`distill.objective`, pure functions): rollout weights and token groups (Eq. 3-5) -> one
     stop-gradient coefficient c_t per token, so that the loss is sum(c * KL) / num_prompts (Eq. 6);
  3. the student: the chunked full-vocabulary reverse KL against the original-view teacher (Eq. 1,
     `distill.kl`), its gradient — micro-batches (`micro_batch_rollouts`) are gradient accumulation around the
     same loss function (`distill.microbatch.accumulate`) — global-norm clip and AdamW. The train state is
     donated. A non-finite loss or gradient norm leaves params and optimizer state unchanged (skipped = 1).
The method decides only which teacher passes run and which coefficients the objective gives; nothing else in
the step depends on it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vaopd_jax.distill import kl as kl_lib
from vaopd_jax.distill import microbatch
from vaopd_jax.distill import objective
from vaopd_jax.distill import teacher as teacher_lib
from vaopd_jax.distill.batch import TrainBatch
from vaopd_jax.distill.state import TrainState
from vaopd_jax.parallel.mesh import on_mesh


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (hashable).

    num_rollouts: >= 1, the rollouts of each prompt (>= 2 for the reweighting methods to mean anything).
    objective: the method and its VA hyper-parameters (`objective.ObjectiveConfig`, validated there).
    kl_chunk_size: response positions per chunk of the full-vocabulary KL (>= 1; `kl.DEFAULT_CHUNK_SIZE`).
    valid_vocab_size: lm_head rows >= this are padding beyond the tokenizer (None: all real).
    micro_batch_rollouts: rollouts per micro-batch, a multiple of num_rollouts that divides the batch (None: all
      at once); teacher scoring and the student's forward and backward then run micro-batch by micro-batch.
    critical_token_ids: ids of the task's vision-critical tokens (the synthetic task's fine-detail words) for the
      metrics that say where the loss and the VA sit; () when unknown.
    log_visual_advantage: run the teacher's pixelated pass and log the VA metrics even when the method does not
      use the VA (standard OPD); the loss is unchanged.
    log_token_gradients: also log grad_critical_share (one more student forward and KL backward per step; the
      miniature's study turns it on).
    """

    num_rollouts: int = 4
    objective: objective.ObjectiveConfig = objective.ObjectiveConfig()
    kl_chunk_size: int = kl_lib.DEFAULT_CHUNK_SIZE
    valid_vocab_size: int | None = None
    micro_batch_rollouts: int | None = None
    critical_token_ids: tuple[int, ...] = ()
    log_visual_advantage: bool = False
    log_token_gradients: bool = False

    def __post_init__(self):
        if not isinstance(self.objective, objective.ObjectiveConfig):
            raise TypeError(f"StepConfig.objective must be an objective.ObjectiveConfig (the method and the VA "
                            f"hyper-parameters); got {self.objective!r}")
        for name in ("num_rollouts", "kl_chunk_size", "valid_vocab_size"):
            value = getattr(self, name)
            if value is not None and value < 1:  # valid_vocab_size may be None (every LM-head row is real)
                raise ValueError(f"StepConfig.{name}={value}; must be >= 1")
        if self.micro_batch_rollouts is not None and (self.micro_batch_rollouts < 1 or
                                                      self.micro_batch_rollouts % self.num_rollouts):
            raise ValueError(f"StepConfig.micro_batch_rollouts={self.micro_batch_rollouts}; must be None or a "
                             f"positive multiple of num_rollouts={self.num_rollouts} (whole prompts)")

    @property
    def pixelated_view(self) -> bool:
        """Whether the teacher scores the pixelated view (the VA is needed or logged)."""
        return self.objective.needs_visual_advantage or self.log_visual_advantage

    @property
    def kl_kwargs(self) -> dict:
        return dict(valid_vocab_size=self.valid_vocab_size, chunk_size=self.kl_chunk_size)


def _student_kl(graphdef, params, batch: TrainBatch, teacher_hidden, teacher_kernel, kl_kwargs):
    """(kl_tok, logp_student), each (rows, Tr): the student's forward and the chunked KL against the teacher."""
    student = nnx.merge(graphdef, params)
    hidden = teacher_lib.response_hidden(student, batch, batch.pixel_values)
    kl_tok, _, logp_student = kl_lib.token_kl_and_logprobs(
        hidden, teacher_lib.lm_head(student), teacher_hidden, teacher_kernel, batch.response_tokens, **kl_kwargs)
    return kl_tok, logp_student


def _token_gradient_norms(graphdef, params, batch, teacher_hidden, teacher_kernel, coefficients, kl_kwargs):
    """(R, Tr) norm of d loss / d h_t, the gradient at each response position's final student hidden state."""
    student = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    hidden = jax.lax.stop_gradient(teacher_lib.response_hidden(student, batch, batch.pixel_values))
    kernel = jax.lax.stop_gradient(teacher_lib.lm_head(student))

    def loss(h):
        kl_tok, _, _ = kl_lib.token_kl_and_logprobs(h, kernel, teacher_hidden, teacher_kernel, batch.response_tokens,
                                                    **kl_kwargs)
        return (coefficients * kl_tok).sum()

    grads = jax.grad(loss)(hidden.astype(jnp.float32))
    return jnp.sqrt((grads.astype(jnp.float32) ** 2).sum(-1))


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _step(config: StepConfig, teacher_graphdef, optimizer, state: TrainState, teacher_params, batch: TrainBatch,
          rng):
    mask = batch.response_mask
    num_micro = microbatch.num_micro_batches(mask.shape[0], config.micro_batch_rollouts, config.num_rollouts)
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    teacher_kernel = teacher_lib.lm_head(teacher)

    # 1. teacher scoring, 2. the objective's coefficients for the whole batch (they couple a prompt's rollouts).
    scores = teacher_lib.score_rollouts(teacher, batch, pixelated=config.pixelated_view, num_micro=num_micro,
                                        num_rollouts=config.num_rollouts, **config.kl_kwargs)
    terms = objective.objective_terms(scores.va, mask, config.num_rollouts, config.objective)
    # Eq. 6 divides by the prompts of the whole batch; with it folded into c, each micro-batch adds its share.
    coefficients = terms.coefficients * teacher_lib.share(1.0, terms.num_prompts)

    # 3. the student's loss, its gradient and the update.
    def loss_fn(params, xs):
        part, teacher_hidden, part_coefficients = xs
        kl_tok, logp_student = _student_kl(state.graphdef, params, part, teacher_hidden, teacher_kernel,
                                           config.kl_kwargs)
        # A select, not a product: a non-finite KL at a masked-out position must not reach the loss.
        return jnp.where(part.response_mask > 0, part_coefficients * kl_tok, 0.0).sum(), (kl_tok, logp_student)

    xs = (batch, scores.hidden, coefficients)
    if num_micro > 1:
        xs = (microbatch.split(batch, num_micro, config.num_rollouts), microbatch.stack(scores.hidden, num_micro),
              microbatch.stack(coefficients, num_micro))
    (loss, (kl_tok, logp_student)), grads = microbatch.accumulate(loss_fn, state.params, xs, num_micro)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(params=keep(new_params, state.params), opt_state=keep(new_opt_state, state.opt_state),
                              step=state.step + 1, rng=rng)

    valid = mask > 0
    high, weights = terms.high_mask, terms.rollout_weights
    nonempty = valid.any(-1)
    critical = valid & teacher_lib.critical_mask(batch.response_tokens, config.critical_token_ids)
    weighted_kl = jnp.where(valid, coefficients * kl_tok, 0.0)
    metrics = {
        "loss": loss,
        "kl": _masked_mean(kl_tok, valid),
        "kl_high": _masked_mean(kl_tok, high),
        "kl_low": _masked_mean(kl_tok, valid & ~high),
        "va_mean": _masked_mean(scores.va, valid),
        "va_high_share": teacher_lib.share(jnp.where(high, scores.va, 0.0).sum(), jnp.where(valid, scores.va, 0.0).sum()),
        "weight_min": jnp.where(nonempty, weights, jnp.inf).min(),
        "weight_max": jnp.where(nonempty, weights, -jnp.inf).max(),
        "grad_norm": grad_norm,
        "teacher_logp": _masked_mean(scores.logp_orig, valid),
        "student_logp": _masked_mean(logp_student, valid),
        "sampler_logp_gap": _masked_mean(jnp.abs(logp_student - batch.sampler_logprobs), valid),
        "num_tokens": valid.sum().astype(jnp.float32),
        "num_high_tokens": high.sum().astype(jnp.float32),
        "num_prompts": terms.num_prompts,
        "num_empty_rollouts": terms.num_empty_rollouts.astype(jnp.float32),
        "num_truncated_rollouts": batch.num_truncated.astype(jnp.float32),
        "skipped": (~finite).astype(jnp.float32),
    }
    if config.critical_token_ids:
        # Where the loss sits: the share of sum(c * KL) on the vision-critical tokens (the dilution the paper names).
        metrics["loss_critical_share"] = teacher_lib.share(jnp.where(critical, weighted_kl, 0.0).sum(),
                                                           jnp.where(valid, weighted_kl, 0.0).sum())
        if config.log_token_gradients:
            norms = _token_gradient_norms(state.graphdef, state.params, batch, scores.hidden, teacher_kernel,
                                          coefficients, config.kl_kwargs)
            metrics["grad_critical_share"] = teacher_lib.share(jnp.where(critical, norms, 0.0).sum(),
                                                               jnp.where(valid, norms, 0.0).sum())
    if config.pixelated_view:
        concentration = teacher_lib.va_concentration(scores.va, mask, batch.response_tokens, config.critical_token_ids)
        metrics.update({f"va_{name}": value for name, value in concentration.items()})
    return new_state, metrics


def make_train_step(config: StepConfig, teacher_graphdef, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, state_sharding=None,
                    compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """The jitted step `(state, teacher_params, batch, rng) -> (state, metrics)`, state donated.

    rng: the step itself draws no randomness (teacher and student run deterministically, no dropout); the
      key becomes the new state's `rng`, so the run's random stream is checkpointed with the state.
    mesh / state_sharding: on a mesh, the new state keeps `state_sharding` (train_state_sharding(state)) so
      donation reuses the buffers, and the metrics come back replicated.
    compiler_options: XLA options for this jit (e.g. {'xla_backend_optimization_level': 0} halves CPU
      compile time in tests).
    metrics (scalars): loss, kl (token mean), kl_high / kl_low (token means in the high / low VA groups),
      va_mean, va_high_share (share of VA mass in the high group), weight_min / weight_max (over non-empty
      rollouts), grad_norm (before clipping), teacher_logp / student_logp (token means of the sampled tokens'
      log-probs), sampler_logp_gap (mean |student - sampler| log-prob), num_tokens, num_high_tokens,
      num_prompts, num_empty_rollouts, num_truncated_rollouts, skipped (1 = non-finite, update not applied).
      VA metrics are 0 when the teacher's pixelated pass does not run (OPD without log_visual_advantage).
      With the pixelated pass: va_top_share, va_top_critical_share, va_critical_share, va_critical_token_share
      (`teacher.va_concentration`). With critical_token_ids: loss_critical_share (share of sum(c * KL) on those
      tokens) and, with log_token_gradients, grad_critical_share (share of the per-token norms of the loss's
      gradient at the student's final hidden states).
    """
    # Runs of one process with the same settings (the study's) share one jitted step: traced and compiled once.
    key = (config, teacher_graphdef, optimizer, mesh, jax.tree.structure(state_sharding),
           tuple(jax.tree.leaves(state_sharding)), tuple(sorted((compiler_options or {}).items())))
    if key in _STEPS:
        _STEPS.move_to_end(key)
    else:
        fn = lambda state, teacher_params, batch, rng: _step(config, teacher_graphdef, optimizer,  # noqa: E731
                                                             state, teacher_params, batch, rng)
        if mesh is None:
            _STEPS[key] = jax.jit(fn, donate_argnums=0, compiler_options=compiler_options)
        else:
            replicated = NamedSharding(mesh, PartitionSpec())
            _STEPS[key] = on_mesh(jax.jit(fn, donate_argnums=0, out_shardings=(state_sharding, replicated),
                                          compiler_options=compiler_options), mesh)
        while len(_STEPS) > 8:  # the least recently used steps (and their executables) go
            _STEPS.popitem(last=False)
    return _STEPS[key]


_STEPS: collections.OrderedDict = collections.OrderedDict()
