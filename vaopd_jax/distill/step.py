"""The fused, jitted VA-OPD train step (DESIGN.md "The data flow of one training step").

    optimizer = make_optimizer(learning_rate=1e-6, total_steps=N)
    state = create_train_state(student_model, optimizer, rng, remat='block', mesh=mesh)
    teacher_graphdef, teacher_params = split_teacher(teacher_model, mesh=mesh)
    train_step = make_train_step(StepConfig(num_rollouts=4, objective=ObjectiveConfig(method="va_opd")),
                                 teacher_graphdef, optimizer,
                                 mesh=mesh, state_sharding=train_state_sharding(state))
    batch = shard_batch(build_train_batch(prompt_batch, tokens, response_mask, 4, cfg), mesh)
    state, metrics = train_step(state, teacher_params, batch, rng)
    logp_orig, logp_pix = two_view_logprobs(model, batch, valid_vocab_size=V)   # the two terms of the VA

One jit: the frozen teacher on the original and the pixelated view (stop-gradient;
the pixelated pass is skipped for 'opd'), sampled-token log-probs -> VA (Eq. 2),
rollout weights and token groups (Eq. 3-5), the student forward with per-block
rematerialization, the chunked full-vocabulary reverse KL against the
original-view teacher (Eq. 1), the loss (Eq. 6), its gradient, global-norm clip
and AdamW with linear warm-up + cosine decay. The train state is donated. A
non-finite loss or gradient norm leaves params and optimizer state unchanged and
reports ``skipped = 1``.

Micro-batching (`StepConfig.micro_batch_rollouts`, config `train.micro_batch_rollouts`): the teacher scores the
rollouts micro-batch by micro-batch (whole prompts, `lax.scan`), VA / weights / token coefficients are computed
for all rollouts, then the student's forward and backward run per micro-batch with the gradients summed in
fp32 and ONE optimizer update: the same loss and gradient up to fp32 reassociation, with activation memory
of one micro-batch (distill/microbatch.py).

Precision: keep the student's params in float32 (the AdamW master copy; lr 1e-6
updates vanish in bf16) with a bf16 compute dtype (Qwen3VL(cfg, param_dtype=
jnp.float32, compute_dtype=jnp.bfloat16)); the teacher in bf16. Softmax, KL and
the objective run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vaopd_jax.distill import kl as kl_lib
from vaopd_jax.distill import microbatch
from vaopd_jax.distill import objective
from vaopd_jax.distill.batch import TrainBatch, build_train_batch  # noqa: F401  (re-exported)
from vaopd_jax.models.qwen3_vl import Qwen3VL
from vaopd_jax.models.qwen3_vl.config import REMAT_POLICIES
from vaopd_jax.models.qwen3_vl import sharding as model_sharding
from vaopd_jax.parallel import multihost
from vaopd_jax.parallel.mesh import on_mesh

@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static switches of the train step (hashable).

    num_rollouts: K >= 1, the rollouts of each prompt (>= 2 for the reweighting methods to mean anything).
    objective: the method and its VA hyper-parameters (`objective.ObjectiveConfig`, validated there).
    kl_chunk_size: response positions per chunk of the full-vocabulary KL (>= 1).
    valid_vocab_size: lm_head rows >= this are padding beyond the tokenizer (None: all real).
    micro_batch_rollouts: rollouts per micro-batch inside the step, a multiple of num_rollouts that divides the
      batch (None: all at once). Teacher scoring and the student's forward and backward then run micro-batch
      by micro-batch, gradients summed in fp32, one optimizer update (distill/microbatch.py).
    critical_token_ids: ids of the task's vision-critical tokens (the synthetic task's fine-detail words), for
      the metrics that say whether the teacher's VA sits on them (`va_concentration`); () when unknown.
    """

    num_rollouts: int = 4
    objective: objective.ObjectiveConfig = objective.ObjectiveConfig()
    kl_chunk_size: int = 256
    valid_vocab_size: int | None = None
    micro_batch_rollouts: int | None = None
    critical_token_ids: tuple[int, ...] = ()

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


@struct.dataclass
class TrainState:
    """Student training state (a pytree; `graphdef` is static).

    params: nnx.State of the student's nnx.Param values; opt_state: optax state;
    step: () int32 steps taken (skipped ones included); rng: PRNG key of the run.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    graphdef: Any = struct.field(pytree_node=False)


def make_schedule(learning_rate: float = 1e-6, total_steps: int = 1000, warmup_fraction: float = 0.05,
                  end_lr_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 over int(warmup_fraction * total_steps) steps, then cosine decay to
    learning_rate * end_lr_fraction at total_steps (optax.warmup_cosine_decay_schedule).

    The release's schedule (EasyR1: num_warmup_steps = int(lr_warmup_ratio * training_steps) and
    get_cosine_schedule_with_warmup, a torch LambdaLR stepped after each update): update s (counting from 0,
    as optax's count does) has lr * s / W while s < W, then lr * 0.5 * (1 + cos(pi * (s - W) / (N - W))).
    optax's warmup_cosine_decay_schedule(0, lr, W, N, 0) is that function (tests/test_step.py checks it)."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}; must be >= 1")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={warmup_fraction}; allowed range [0, 1)")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate}; must be > 0")
    warmup = int(warmup_fraction * total_steps)  # truncated, as the release (0.05 x 655 -> 32)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=learning_rate * end_lr_fraction)


def make_optimizer(learning_rate: float = 1e-6, total_steps: int = 1000, warmup_fraction: float = 0.05,
                   b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1, clip_norm: float = 1.0,
                   end_lr_fraction: float = 0.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and linear warm-up + cosine decay (METHOD.md recipe).

    Weight decay applies to every parameter (verl's FSDP AdamW convention). The learning rate at step s
    is make_schedule(...)(s) with the same arguments.
    """
    schedule = make_schedule(learning_rate, total_steps, warmup_fraction, end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def _graphdef_with_remat(model: Qwen3VL, remat: str | None):
    """The model's graphdef, rebuilt (abstractly, no weights) with another remat policy if asked."""
    graphdef, _ = nnx.split(model, nnx.Param)
    if remat is None or remat == model.config.remat:
        return graphdef
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; allowed: {REMAT_POLICIES}")
    cfg = model.config.replace(remat=remat)
    abstract = nnx.eval_shape(lambda: Qwen3VL(cfg, param_dtype=model.param_dtype,
                                              compute_dtype=model.compute_dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)[0]


def create_train_state(student: Qwen3VL, optimizer: optax.GradientTransformation, rng: jax.Array, *,
                       remat: str | None = None, mesh: Mesh | None = None, rules=None) -> TrainState:
    """TrainState from a student model: a copy of its params (sharded by the logical-axis rules when `mesh`
    is given; the model itself stays usable), a fresh optimizer state laid out like them, step 0.

    remat: 'none' | 'block' rebuilds the student's graph with that per-block rematerialization policy
      (None keeps the model's own).
    Several processes: every process passes the same student; params that are still process-local (a random
    init) become global arrays, checkpoint-loaded ones (already on the mesh) are resharded.
    """
    graphdef = _graphdef_with_remat(student, remat)
    params = nnx.state(student, nnx.Param)
    several = jax.process_count() > 1

    def place(x, sharding):
        # device_put only reaches this process's devices: identical local values become global arrays.
        if several and x.is_fully_addressable:
            return multihost.to_global(x, sharding)
        # A copy (may_alias=False): the step donates the state, which must not delete the model's own arrays.
        return jax.device_put(x, sharding, may_alias=False)

    if mesh is not None:
        param_shardings = model_sharding.param_shardings(student, mesh, rules)
        params = jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: place(x, sharding), sub),
                              param_shardings, params)
        opt_shardings = abstract_train_state_sharding(optimizer, params, graphdef, mesh).opt_state
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    else:
        params = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
        opt_state = jax.jit(optimizer.init)(params)
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    if mesh is not None:
        step, rng = place(jnp.zeros((), jnp.int32), replicated), place(jnp.asarray(rng), replicated)
    else:
        step, rng = jnp.zeros((), jnp.int32), jnp.asarray(rng)
    state = TrainState(params=params, opt_state=opt_state, step=step, rng=rng, graphdef=graphdef)
    # Commit every leaf to its device(s): the step's outputs are committed, and a committed/uncommitted
    # mismatch between the first and later calls would compile the step twice.
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)


def split_teacher(teacher: Qwen3VL, *, mesh: Mesh | None = None, rules=None):
    """(graphdef, params) of the frozen teacher; params sharded by the rules when `mesh` is given."""
    graphdef, params = nnx.split(teacher, nnx.Param)
    if mesh is not None:
        params = jax.device_put(params, model_sharding.param_shardings(teacher, mesh, rules))
    return graphdef, params


def train_state_sharding(state: TrainState):
    """The sharding pytree of a concrete TrainState (for make_train_step's out_shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)


def abstract_train_state_sharding(optimizer: optax.GradientTransformation, params, graphdef, mesh: Mesh):
    """TrainState-shaped shardings from params whose leaves carry `.sharding` (concrete arrays, or
    jax.ShapeDtypeStruct for AOT compilation without weights): optimizer moments follow their params,
    everything else is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, p: p.sharding, abstract_opt, params,
                                          transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated, rng=replicated,
                      graphdef=graphdef)


def batch_partition_specs(batch: TrainBatch, mesh: Mesh, rules=None) -> TrainBatch:
    """PartitionSpecs for a TrainBatch: rows / prompts on the batch mesh axes, the rest replicated."""
    def spec(x, batch_axis):  # x: an array or a jax.ShapeDtypeStruct
        if x is None:
            return None
        shape = tuple(np.shape(x)) if isinstance(x, np.ndarray) else tuple(x.shape)
        axes = [None] * len(shape)
        if batch_axis is not None:
            axes[batch_axis] = "batch"
        return model_sharding.logical_to_spec(axes, rules, mesh, shape)

    vision = None
    if batch.vision_inputs is not None:
        vision = type(batch.vision_inputs)(*(spec(f, 0) for f in batch.vision_inputs))
    return TrainBatch(
        input_ids=spec(batch.input_ids, 0), attention_mask=spec(batch.attention_mask, 0),
        position_ids=spec(batch.position_ids, 1), response_positions=spec(batch.response_positions, 0),
        response_tokens=spec(batch.response_tokens, 0), response_mask=spec(batch.response_mask, 0),
        sampler_logprobs=spec(batch.sampler_logprobs, 0), pixel_values=spec(batch.pixel_values, 0),
        pixel_values_pixelated=spec(batch.pixel_values_pixelated, 0), vision_inputs=vision,
        image_rows=spec(batch.image_rows, None), num_truncated=spec(batch.num_truncated, None))


def shard_batch(batch: TrainBatch, mesh: Mesh | None = None, rules=None) -> TrainBatch:
    """Moves a host TrainBatch to device(s): on a mesh, rows / prompts split over the batch axes."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    specs = batch_partition_specs(batch, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), batch, specs,
                        is_leaf=lambda x: x is None)


def response_hidden(model: Qwen3VL, batch: TrainBatch, pixel_values) -> jax.Array:
    """Final hidden states at the positions that predict the response tokens: (R, Tr, E)."""
    image_embeds = deepstack = None
    if pixel_values is not None:
        # The vision tower runs once per prompt; the K rollouts share it by a gather.
        image_embeds, deepstack = model.encode_prompt_images(pixel_values, batch.vision_inputs, batch.image_rows)
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids,
                                 image_embeds=image_embeds, deepstack_embeds=deepstack)
    return jnp.take_along_axis(hidden, batch.response_positions[..., None], axis=1)


def lm_head(model: Qwen3VL) -> jax.Array:
    """The (E, V) LM head in the model's compute dtype: the one cast every chunked KL / log-prob here uses."""
    return model.lm_head_kernel().astype(model.compute_dtype)


def view_logprobs(model: Qwen3VL, batch: TrainBatch, pixel_values, *, valid_vocab_size: int | None = None,
                  chunk_size: int = 256) -> jax.Array:
    """(R, Tr) float32 log p(y_t | view, x, y_<t) of the sampled response tokens, chunk by chunk (never
    (R, Tr, V) at once); `pixel_values` picks the view (batch.pixel_values or batch.pixel_values_pixelated)."""
    return kl_lib.token_logprobs(response_hidden(model, batch, pixel_values), lm_head(model), batch.response_tokens,
                                 valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)


def two_view_logprobs(model: Qwen3VL, batch: TrainBatch, *, valid_vocab_size: int | None = None,
                      chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """(logp_orig, logp_pix), each (R, Tr): the sampled tokens' log-probs with the original and with the
    pixelated image, the two terms of the visual advantage (Eq. 2, `objective.visual_advantage`). The train
    step, the trainer's validation (student VA) and the notebooks' VA views all compute them here."""
    kw = dict(valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)
    return (view_logprobs(model, batch, batch.pixel_values, **kw),
            view_logprobs(model, batch, batch.pixel_values_pixelated, **kw))


def va_concentration(va, mask, tokens, critical_token_ids=(), fraction: float = 0.1) -> dict:
    """Where the VA mass of a batch of rollouts sits (the paper: the top 10 % of tokens carry ~93 % of it).

    va, mask, tokens: (R, T) per-token VA (>= 0), response mask, token ids. The top tokens are the
    ceil(fraction x n) valid tokens with the largest VA (n valid tokens; ties: earlier rows and tokens first).
    Returns scalars (0 when the VA mass is 0, e.g. for standard OPD, which does not compute it):
      top_share: share of the VA mass carried by the top tokens;
      top_critical_share: share of the top tokens' VA mass that sits on `critical_token_ids`;
      critical_share: share of all VA mass on `critical_token_ids`;
      critical_token_share: share of the valid tokens that are critical (the share a uniform VA would give).
    """
    valid = (mask > 0).reshape(-1)
    flat = jnp.where(valid, va.reshape(-1), 0.0)
    k = jnp.ceil(fraction * valid.sum())
    order = jnp.argsort(jnp.where(valid, -flat, jnp.inf), stable=True)
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    top = valid & (rank < k)
    critical = valid & jnp.isin(tokens.reshape(-1), jnp.asarray(tuple(critical_token_ids) or (-1,), jnp.int32))
    share = lambda part, whole: jnp.where(whole > 0, part / jnp.maximum(whole, 1e-30), 0.0)  # noqa: E731
    total, top_mass = flat.sum(), jnp.where(top, flat, 0.0).sum()
    return {"top_share": share(top_mass, total),
            "top_critical_share": share(jnp.where(top & critical, flat, 0.0).sum(), top_mass),
            "critical_share": share(jnp.where(critical, flat, 0.0).sum(), total),
            "critical_token_share": share(critical.sum().astype(jnp.float32), valid.sum().astype(jnp.float32))}


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _whole_batch_loss_and_grads(config: StepConfig, teacher: Qwen3VL, state: TrainState, batch: TrainBatch):
    """(loss, grads, (kl_tok, va, terms, logp_teacher, logp_student)) with every rollout at once: the teacher's
    original-view log-probs come with the KL (same hidden states, one LM-head pass); the pixelated view's alone."""
    obj_cfg = config.objective
    mask = batch.response_mask
    kl_kwargs = dict(valid_vocab_size=config.valid_vocab_size, chunk_size=config.kl_chunk_size)
    teacher_hidden = jax.lax.stop_gradient(response_hidden(teacher, batch, batch.pixel_values))
    if obj_cfg.needs_visual_advantage:
        logp_pix = jax.lax.stop_gradient(view_logprobs(teacher, batch, batch.pixel_values_pixelated, **kl_kwargs))
        # The pixelated view's chunked log-probs finish before the KL starts: XLA's scheduler otherwise runs the
        # two vocabulary-sized passes side by side (on CPU, ~2 chunks of logits more at the peak).
        logp_pix, teacher_hidden = jax.lax.optimization_barrier((logp_pix, teacher_hidden))
    else:
        logp_pix = None

    def loss_fn(params):
        student = nnx.merge(state.graphdef, params)
        student_hidden = response_hidden(student, batch, batch.pixel_values)
        kl_tok, logp_teacher, logp_student = kl_lib.token_kl_and_logprobs(
            student_hidden, lm_head(student), teacher_hidden, lm_head(teacher), batch.response_tokens, **kl_kwargs)
        if logp_pix is not None:
            va = objective.visual_advantage(logp_teacher, logp_pix, mask)
        else:
            va = jnp.zeros(mask.shape, jnp.float32)
        terms = objective.objective_terms(va, mask, config.num_rollouts, obj_cfg)
        return objective.weighted_loss(kl_tok, terms), (kl_tok, va, terms, logp_teacher, logp_student)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, grads, aux


def _micro_batched_loss_and_grads(config: StepConfig, num_micro: int, teacher: Qwen3VL, state: TrainState,
                                  batch: TrainBatch):
    """The same as `_whole_batch_loss_and_grads`, `num_micro` micro-batches of whole prompts at a time
    (distill/microbatch.py): the teacher scores every micro-batch first (both views, scanned), then VA, rollout
    weights and token coefficients are computed for the whole batch, then the student's forward and backward
    run micro-batch by micro-batch against the stored teacher hidden states, gradients summed in fp32."""
    obj_cfg = config.objective
    mask = batch.response_mask
    kl_kwargs = dict(valid_vocab_size=config.valid_vocab_size, chunk_size=config.kl_chunk_size)
    teacher_kernel = lm_head(teacher)
    micro = microbatch.split(batch, num_micro, config.num_rollouts)

    def score(_, mb: TrainBatch):
        hidden = jax.lax.stop_gradient(response_hidden(teacher, mb, mb.pixel_values))
        logp_orig = kl_lib.token_logprobs(hidden, teacher_kernel, mb.response_tokens, **kl_kwargs)
        if obj_cfg.needs_visual_advantage:
            logp_pix = jax.lax.stop_gradient(view_logprobs(teacher, mb, mb.pixel_values_pixelated, **kl_kwargs))
        else:
            logp_pix = jnp.zeros_like(logp_orig)
        return None, (hidden, logp_orig, logp_pix)

    _, (teacher_hidden, logp_orig, logp_pix) = jax.lax.scan(score, None, micro)
    logp_teacher = microbatch.join(logp_orig)
    if obj_cfg.needs_visual_advantage:
        va = objective.visual_advantage(logp_teacher, microbatch.join(logp_pix), mask)
    else:
        va = jnp.zeros(mask.shape, jnp.float32)
    terms = objective.objective_terms(va, mask, config.num_rollouts, obj_cfg)
    # weighted_loss = sum(c * KL) / num_prompts is linear in the KL: each micro-batch adds its share.
    scale = jnp.where(terms.num_prompts > 0, 1.0 / jnp.maximum(terms.num_prompts, 1.0), 0.0)
    coefficients = (terms.coefficients * scale).reshape((num_micro, -1) + mask.shape[1:])

    def train(carry, xs):
        grad_sum, loss_sum = carry
        mb, mb_teacher_hidden, mb_coefficients = xs

        def loss_fn(params):
            student = nnx.merge(state.graphdef, params)
            student_hidden = response_hidden(student, mb, mb.pixel_values)
            kl_tok, _, logp_student = kl_lib.token_kl_and_logprobs(
                student_hidden, lm_head(student), mb_teacher_hidden, teacher_kernel, mb.response_tokens, **kl_kwargs)
            return (mb_coefficients * kl_tok).sum(), (kl_tok, logp_student)

        (loss, (kl_tok, logp_student)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_sum = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grad_sum, grads)
        return (grad_sum, loss_sum + loss), (kl_tok, logp_student)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, loss), (kl_tok, logp_student) = jax.lax.scan(
        train, (zeros, jnp.zeros((), jnp.float32)), (micro, teacher_hidden, coefficients))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    return loss, grads, (microbatch.join(kl_tok), va, terms, logp_teacher, microbatch.join(logp_student))


def _step(config: StepConfig, teacher_graphdef, optimizer, state: TrainState, teacher_params, batch: TrainBatch,
          rng):
    obj_cfg = config.objective
    mask = batch.response_mask
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    num_micro = microbatch.num_micro_batches(mask.shape[0], config.micro_batch_rollouts, config.num_rollouts)
    if num_micro == 1:
        loss, grads, aux = _whole_batch_loss_and_grads(config, teacher, state, batch)
    else:
        loss, grads, aux = _micro_batched_loss_and_grads(config, num_micro, teacher, state, batch)
    kl_tok, va, terms, logp_teacher, logp_student = aux
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(params=keep(new_params, state.params), opt_state=keep(new_opt_state, state.opt_state),
                              step=state.step + 1, rng=rng)

    valid = mask > 0
    if obj_cfg.needs_visual_advantage:
        high = objective.high_group_mask(va, mask, obj_cfg.high_fraction)
    else:
        high = jnp.zeros(mask.shape, bool)
    low = valid & ~high
    nonempty = valid.any(-1)
    weights = terms.rollout_weights
    metrics = {
        "loss": loss,
        "kl": _masked_mean(kl_tok, valid),
        "kl_high": _masked_mean(kl_tok, high),
        "kl_low": _masked_mean(kl_tok, low),
        "va_mean": _masked_mean(va, valid),
        "va_high_share": jnp.where(high, va, 0.0).sum() / jnp.maximum(jnp.where(valid, va, 0.0).sum(), 1e-30),
        "weight_min": jnp.where(nonempty, weights, jnp.inf).min(),
        "weight_max": jnp.where(nonempty, weights, -jnp.inf).max(),
        "grad_norm": grad_norm,
        "teacher_logp": _masked_mean(logp_teacher, valid),
        "student_logp": _masked_mean(logp_student, valid),
        "sampler_logp_gap": _masked_mean(jnp.abs(logp_student - batch.sampler_logprobs), valid),
        "num_tokens": valid.sum().astype(jnp.float32),
        "num_high_tokens": high.sum().astype(jnp.float32),
        "num_prompts": terms.num_prompts,
        "num_empty_rollouts": terms.num_empty_rollouts.astype(jnp.float32),
        "num_truncated_rollouts": batch.num_truncated.astype(jnp.float32),
        "skipped": (~finite).astype(jnp.float32),
    }
    if obj_cfg.needs_visual_advantage:
        concentration = va_concentration(va, mask, batch.response_tokens, config.critical_token_ids)
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
      VA metrics are 0 for 'opd', which skips the pixelated teacher pass. The VA methods add
      va_top_share, va_top_critical_share, va_critical_share, va_critical_token_share (`va_concentration`).
    """
    fn = lambda state, teacher_params, batch, rng: _step(config, teacher_graphdef, optimizer, state,
                                                         teacher_params, batch, rng)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0, compiler_options=compiler_options)
    replicated = NamedSharding(mesh, PartitionSpec())
    return on_mesh(jax.jit(fn, donate_argnums=0, out_shardings=(state_sharding, replicated),
                           compiler_options=compiler_options), mesh)
