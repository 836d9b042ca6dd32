"""The student's train state, its optimizer, and where the state and the frozen teacher live on a mesh.

    optimizer = make_optimizer(learning_rate=1e-6, total_steps=N)
    state = create_train_state(student_model, optimizer, rng, remat='block', mesh=mesh)
    teacher_graphdef, teacher_params = split_teacher(teacher_model, mesh=mesh)
    state_sharding = train_state_sharding(state)          # make_train_step's out_shardings

Precision: the student's params stay float32 (the AdamW master copy; lr 1e-6 updates vanish in bf16) with a
bf16 compute dtype (Qwen3VL(cfg, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16)); the teacher is bf16 and
holds no optimizer state.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vaopd_jax.models.qwen3_vl import Qwen3VL
from vaopd_jax.models.qwen3_vl import sharding as model_sharding
from vaopd_jax.models.qwen3_vl.config import REMAT_POLICIES
from vaopd_jax.parallel import multihost


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


@functools.lru_cache(maxsize=None)  # the same settings give the same object: runs of one process share the step
def make_optimizer(learning_rate: float = 1e-6, total_steps: int = 1000, warmup_fraction: float = 0.05,
                   b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1, clip_norm: float = 1.0,
                   end_lr_fraction: float = 0.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and linear warm-up + cosine decay (the paper's recipe).

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
