"""Logical axis names -> mesh axes ('data', 'fsdp', 'expert', 'tensor') for Qwen3-VL parameters and activations.

Every nnx.Param of the model carries `logical_axes` metadata (layers.param). A rule table maps each logical
name to a mesh axis, a tuple of mesh axes, or None (replicated). Changing the parallelism is a change of
rules/mesh, not of model code (the MaxText convention).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# fsdp shards the model width ('embed'); tensor shards heads / MLP / vocab (Megatron-style column/row split).
# expert (expert parallelism) shards the experts of a MoE layer; for everything else it is one more data/fsdp
# axis: the batch and the model width are sharded over it too (the MaxText convention), so a mesh with an expert
# axis wastes no memory or compute on the dense parts. A mesh axis is used once per array, so an expert kernel
# (expert, embed, expert_mlp) is split over 'expert', 'fsdp' and 'tensor'.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": None,
    "stack": None,
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vision_embed": ("fsdp", "expert"),
    "vision_mlp": "tensor",
    "vision_qkv": "tensor",
    "vision_heads": "tensor",
    "vision_patch": None,
    "vision_pos": None,
    "vision_merged": ("fsdp", "expert"),
}


def logical_to_spec(axes: Sequence[str | None], rules: Mapping | None = None, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names.

    A mesh axis is used at most once per array (first come); when `mesh` and `shape` are given, a dimension
    that the mesh axes do not divide evenly is left replicated instead of failing (e.g. 2 kv heads on
    tensor=4)."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = None if name is None else rules[name]
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        names = tuple(n for n in names if n not in used and (mesh is None or n in mesh.shape))
        if mesh is not None:
            names = tuple(n for n in names if mesh.shape[n] > 1)
            if shape is not None and names:
                size = int(np.prod([mesh.shape[n] for n in names]))
                if shape[i] % size:
                    names = ()
        used.update(names)
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def param_partition_specs(model: nnx.Module, rules: Mapping | None = None, mesh: Mesh | None = None):
    """An nnx.State-shaped pytree of PartitionSpecs for every Param of `model`."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(
        lambda v: logical_to_spec(v.get_metadata()["logical_axes"], rules, mesh, v.shape),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None):
    specs = param_partition_specs(model, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
    """Moves every parameter of `model` onto `mesh` per the rules (in place) and returns the model."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(model, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, rules: Mapping | None = None) -> NamedSharding:
    """Sharding for an activation / input whose `batch_axis` is the batch: batch on ('data', 'fsdp', 'expert')."""
    axes = [None] * ndim
    axes[batch_axis] = "batch"
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))


def constrain(x, axes: Sequence[str | None], rules: Mapping | None = None):
    """with_sharding_constraint by logical axes when a mesh is set (`jax.set_mesh`); a no-op otherwise.

    Keeps activations batch-sharded on ('data', 'fsdp', 'expert') inside the model, whatever GSPMD would propagate from
    the fsdp/tensor-sharded weights."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh, x.shape))


def target_platform() -> str:
    """The platform being traced for: that of the context mesh's devices (`jax.set_mesh`; a deviceless compile for
    a TPU or GPU traced on a CPU host sets a mesh of the target's devices), else JAX's default backend. Kernel
    choices that depend on the hardware read this, not `jax.default_backend()`, so an ahead-of-time compile for a
    TPU compiles the TPU program."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)  # works inside jit, unlike get_mesh
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()
