"""The routed-experts MLP of the Qwen3-VL MoE text decoder (transformers' Qwen3VLMoeTextSparseMoeBlock).

    weights, experts = route(h, router_kernel, top_k, norm_topk_prob)     # (N, k) fp32, (N, k) int32
    y = sparse_mlp(h, p, cfg, dtype)                                     # h (B, T, E) -> (B, T, E)

Routing (transformers): router logits h @ W_r (in the compute dtype), softmax in fp32, the top-k probabilities,
renormalised to sum to 1 when `norm_topk_prob`. Each routed (token, expert) pair goes through that expert's
SwiGLU (down(silu(gate x) * up x)) and is scaled by its weight; a token's output is the sum over its k experts.

Dropless and grouped: the (token, expert) pairs of a chunk of tokens are sorted by expert and the experts run as
grouped matmuls over the sorted rows (grouped.py: `cfg.moe_impl` 'tiled', a loop over row tiles of one expert
each, or 'ragged_dot', `jax.lax.ragged_dot`, native on TPU only), so every pair is computed (no capacity
factor, nothing dropped) and no expert is applied to a token it was not routed to. Tokens are processed
`cfg.moe_chunk_size` at a time (a `lax.map` over chunks), so the sorted (tokens x k, E) buffers stay bounded
whatever the batch.

Expert parallelism: when a mesh is set (`jax.set_mesh`) the expert matmuls run under `jax.shard_map`. Each
device holds the experts of its shard of the 'expert' logical axis (rules in sharding.py: the 'expert' mesh
axis), all-gathers the tokens of the devices that share its batch shard but hold other experts, computes its
own experts' share for all of them, and reduce-scatters the result back (an 'expert'-sharded batch), or
all-reduces it (a batch replicated over the expert axis). An expert weight sharded over 'fsdp' on its model
width is all-gathered inside (FSDP), one sharded over 'tensor' on its MLP width gives partial sums that are
all-reduced (Megatron-style split of gate/up by columns and down by rows). Without a mesh every expert is local.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .config import Qwen3VLConfig
from .grouped import expert_swiglu
from .layers import param
from .sharding import logical_to_spec

# Per-layer logical axes of the MoE parameters (the stacked parameters add a leading 'layers').
ROUTER_AXES = ("embed", None)
GATE_UP_AXES = ("expert", "embed", "expert_mlp")
DOWN_AXES = ("expert", "expert_mlp", "embed")
PARAM_NAMES = ("router_kernel", "expert_gate_kernel", "expert_up_kernel", "expert_down_kernel")


def expert_params(cfg: Qwen3VLConfig, num_sparse_layers: int, dtype, rngs: nnx.Rngs) -> dict[str, nnx.Param]:
    """The MoE parameters of `num_sparse_layers` sparse layers, stacked on a leading 'layers' axis.

    router_kernel (Ls, E, X); expert_gate_kernel, expert_up_kernel (Ls, X, E, I); expert_down_kernel (Ls, X, I, E),
    with X experts of width I = moe_intermediate_size. Kernels are (in, out) like the dense ones (the Hugging Face
    tensors are (out, in), convert.py transposes)."""
    t = cfg.text
    L, E, X, I = num_sparse_layers, t.hidden_size, t.num_experts, t.moe_intermediate_size
    return {
        "router_kernel": param(rngs, (L, E, X), ("layers",) + ROUTER_AXES, dtype),
        "expert_gate_kernel": param(rngs, (L, X, E, I), ("layers",) + GATE_UP_AXES, dtype),
        "expert_up_kernel": param(rngs, (L, X, E, I), ("layers",) + GATE_UP_AXES, dtype),
        "expert_down_kernel": param(rngs, (L, X, I, E), ("layers",) + DOWN_AXES, dtype),
    }


def route(h, router_kernel, top_k: int, norm_topk_prob: bool):
    """h (N, E), router_kernel (E, X) -> (weights (N, k) float32, experts (N, k) int32), best expert first.

    transformers' Qwen3VLMoeTextTopKRouter: logits in h's dtype, softmax in fp32, top-k of the probabilities
    (ties: the lower expert id first), renormalised when norm_topk_prob."""
    logits = jnp.dot(h, router_kernel.astype(h.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    # transformers casts the weights back to the router logits' dtype before scaling the expert outputs.
    return weights.astype(h.dtype).astype(jnp.float32), experts.astype(jnp.int32)


def grouped_swiglu(x, experts, weights, gate, up, down, first_expert, *, impl: str = "auto", tile: int = 512):
    """The local experts' share of the MoE output for one chunk of tokens.

    x (C, E); experts (C, k) int32 global expert ids (negative: padding, routed nowhere); weights (C, k) fp32;
    gate, up (Xl, E, I) and down (Xl, I, E): the Xl experts held here, ids [first_expert, first_expert + Xl).
    Returns (C, E) float32: sum over each token's routed experts held here of weight * SwiGLU_expert(x).
    The C*k (token, expert) pairs are sorted by local expert (pairs routed elsewhere last); the group sizes
    cover only the local pairs, so the grouped matmuls (grouped.expert_swiglu, `impl`, `tile`) leave the
    trailing rows zero."""
    c, k = experts.shape
    n_local = gate.shape[0]
    local = experts.reshape(-1) - first_expert
    is_local = (local >= 0) & (local < n_local)
    key = jnp.where(is_local, local, n_local)
    order = jnp.argsort(key, stable=True)
    token = order // k
    group_sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)
    rows = jnp.take(x, token, axis=0)
    dt = x.dtype
    y = expert_swiglu(rows, group_sizes, gate, up, down, impl=impl, tile=tile)
    scale = jnp.where(is_local, weights.reshape(-1), 0.0)[order]
    # transformers scales each expert output in the model dtype, then sums the k of them; fp32 sum here.
    y = (y * scale.astype(dt)[:, None]).astype(jnp.float32)
    return jnp.zeros((c, x.shape[1]), jnp.float32).at[token].add(y)


def _chunked(fn: Callable, chunk: int, x, experts, weights):
    """Applies fn(x_c, experts_c, weights_c) -> (C, E) to chunks of `chunk` tokens (the last one padded with
    tokens routed nowhere) and concatenates the results: (N, E)."""
    n = x.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=-1)
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    m = (n + pad) // chunk
    if m == 1:
        out = fn(x, experts, weights)
    else:
        split = lambda a: a.reshape((m, chunk) + a.shape[1:])
        out = jax.lax.map(lambda args: fn(*args), (split(x), split(experts), split(weights)))
        out = out.reshape((m * chunk,) + out.shape[2:])
    return out[:n]


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def sparse_mlp(h, p: dict, cfg: Qwen3VLConfig, dtype):
    """The routed-experts MLP of one layer: h (B, T, E) (post-attention RMSNorm output, compute dtype) and the
    layer's slice of the MoE parameters -> (B, T, E) in dtype."""
    x = h.astype(dtype)
    params = (p["router_kernel"], p["expert_gate_kernel"], p["expert_up_kernel"], p["expert_down_kernel"])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(size == 1 for size in mesh.shape.values()):
        b, s, e = x.shape
        return _local_moe(x.reshape(b * s, e), *params, cfg, chunk=cfg.moe_chunk_size).reshape(b, s, e).astype(dtype)
    return _sharded_moe(mesh, x, *params, cfg).astype(dtype)


def _local_moe(x, router, gate, up, down, cfg: Qwen3VLConfig, *, chunk: int, first_expert=0,
               gather: Callable | None = None, scatter: Callable | None = None):
    """Routes the tokens x (N, E) and applies the experts held here (ids from first_expert) chunk by chunk.

    gather / scatter (expert parallelism): per chunk, the routed tokens of the devices holding other experts are
    gathered before the grouped matmuls and the results reduce-scattered back. Returns (N, E) in x.dtype."""
    t = cfg.text
    weights, experts = route(x, router, t.num_experts_per_tok, t.norm_topk_prob)

    def one_chunk(xc, ec, wc):
        if gather is not None:
            xc, ec, wc = gather(xc), gather(ec), gather(wc)
        y = grouped_swiglu(xc, ec, wc, gate, up, down, first_expert, impl=cfg.moe_impl,
                           tile=cfg.moe_tile_size).astype(x.dtype)
        return y if scatter is None else scatter(y)

    return _chunked(one_chunk, chunk, x, experts, weights)


def _sharded_moe(mesh, x, router, gate, up, down, cfg: Qwen3VLConfig):
    """sparse_mlp under shard_map (see the module docstring). x (B, T, E); router (E, X); gate/up (X, E, I), down
    (X, I, E) in their logical-axis shardings. Routing is local to each device's tokens. Returns (B, T, E)."""
    x_spec = logical_to_spec(("batch", None, None), None, mesh, x.shape)
    router_spec = logical_to_spec(ROUTER_AXES, None, mesh, router.shape)
    gate_spec = logical_to_spec(GATE_UP_AXES, None, mesh, gate.shape)
    down_spec = logical_to_spec(DOWN_AXES, None, mesh, down.shape)
    batch_axes = _axes(x_spec[0])
    expert_axes, width_axes, mlp_axes = (_axes(a) for a in gate_spec)
    if (_axes(down_spec[0]), _axes(down_spec[1]), _axes(down_spec[2])) != (expert_axes, mlp_axes, width_axes):
        raise ValueError(f"expert kernels sharded inconsistently: gate/up {gate_spec}, down {down_spec}")
    router_axes = tuple(a for entry in router_spec for a in _axes(entry))
    # Tokens that differ along an expert-sharding axis are gathered (and the result scattered back); along an
    # expert axis that does not shard the batch, every device already has all the tokens: sum the shares.
    gather_axes = tuple(a for a in batch_axes if a in expert_axes)
    sum_axes = tuple(a for a in expert_axes if a not in batch_axes) + mlp_axes
    gather_size = 1
    for a in gather_axes:
        gather_size *= mesh.shape[a]

    def local(x, router, gate, up, down):
        bl, s, e = x.shape
        if router_axes:  # the router is small: every device scores its own tokens against all experts
            router = jax.lax.all_gather(router, router_axes, axis=0, tiled=True)
        if width_axes:  # FSDP: the full model width of this layer's local experts
            gate = jax.lax.all_gather(gate, width_axes, axis=1, tiled=True)
            up = jax.lax.all_gather(up, width_axes, axis=1, tiled=True)
            down = jax.lax.all_gather(down, width_axes, axis=2, tiled=True)
        first = jax.lax.axis_index(expert_axes) * gate.shape[0] if expert_axes else 0
        gather = scatter = None
        if gather_axes:
            gather = lambda a: jax.lax.all_gather(a, gather_axes, axis=0, tiled=True)  # noqa: E731
            scatter = lambda a: jax.lax.psum_scatter(a, gather_axes, scatter_dimension=0, tiled=True)  # noqa: E731
        out = _local_moe(x.reshape(bl * s, e), router, gate, up, down, cfg, chunk=max(1, cfg.moe_chunk_size //
                         gather_size), first_expert=first, gather=gather, scatter=scatter)
        if sum_axes:
            out = jax.lax.psum(out, sum_axes)
        return out.reshape(bl, s, e)

    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, router_spec, gate_spec, gate_spec, down_spec),
                         out_specs=x_spec)(x, router, gate, up, down)
