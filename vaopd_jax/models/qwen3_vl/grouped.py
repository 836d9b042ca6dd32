"""Grouped SwiGLU over expert-sorted rows: every expert applied only to its own rows (a grouped GEMM).

    y = expert_swiglu(rows, group_sizes, gate, up, down, impl="tiled", tile=512)
        rows (M, E) sorted by expert: the first group_sizes[0] rows belong to expert 0, the next group_sizes[1]
        to expert 1, ...; rows past sum(group_sizes) belong to no expert. gate, up (X, E, I), down (X, I, E).
        -> (M, E): down_e(silu(gate_e x) * up_e x) for each row x of expert e; 0 for the trailing rows.

Two implementations, the same numbers:
- 'ragged_dot': `jax.lax.ragged_dot`, three grouped products. TPUs run it natively. XLA's GPU and CPU backends
  rewrite it into a dense dot over a group-masked copy of the rows for EVERY expert (X times the FLOPs and an
  (X, M, E) temporary), so it is the TPU choice only.
- 'tiled': each expert's rows are padded to a multiple of `tile` rows, so every tile of the padded buffer
  belongs to one expert; a loop over the non-empty tiles only (its trip count is data: the routed rows, not the
  worst case) applies that expert's three matmuls to the tile. Work is the routed rows plus at most tile - 1
  padding rows per expert, on any backend. Differentiable (custom VJP: the backward loop recomputes each tile's
  activations and accumulates the expert weight gradients tile by tile).
`IMPLS` lists them; 'auto' (the config default) picks 'ragged_dot' on TPU and 'tiled' elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .config import MOE_IMPLS as IMPLS  # one list, validated in config.validate
from .sharding import target_platform


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"moe_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "ragged_dot" if target_platform() == "tpu" else "tiled"
    return impl


def expert_swiglu(rows, group_sizes, gate, up, down, *, impl: str = "auto", tile: int = 512):
    """See the module docstring. group_sizes (X,) int32; returns (M, E) in rows.dtype."""
    impl = resolve_impl(impl)
    rows = jnp.asarray(rows)
    dt = rows.dtype
    gate, up, down = (jnp.asarray(w, dt) for w in (gate, up, down))
    if impl == "ragged_dot":
        g = jax.lax.ragged_dot(rows, gate, group_sizes)
        u = jax.lax.ragged_dot(rows, up, group_sizes)
        return jax.lax.ragged_dot(jax.nn.silu(g) * u, down, group_sizes)
    return _tiled(rows, group_sizes, gate, up, down, tile)


def _tiled(rows, group_sizes, gate, up, down, tile: int):
    m, e = rows.shape
    n_experts = gate.shape[0]
    tile = max(1, min(tile, m))
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    padded = (group_sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    # Static size of the padded buffer: every row routed, plus tile - 1 padding rows per expert, in whole tiles.
    n_tiles = -(-(m + n_experts * (tile - 1)) // tile)
    size = n_tiles * tile
    j = jnp.arange(m, dtype=jnp.int32)
    expert_of_row = jnp.minimum(jnp.searchsorted(ends, j, side="right"), n_experts - 1)
    routed = j < ends[-1]
    position = jnp.where(routed, padded_starts[expert_of_row] + j - starts[expert_of_row], size)
    buffer = jnp.zeros((size, e), rows.dtype).at[position].set(rows, mode="drop")
    tile_expert = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(n_tiles, dtype=jnp.int32) * tile,
                                               side="right"), n_experts - 1).astype(jnp.int32)
    n_valid = (padded_ends[-1] // tile).astype(jnp.int32)
    out = _tiles_swiglu(buffer, gate, up, down, tile_expert, n_valid, tile)
    return jnp.take(out, jnp.minimum(position, size - 1), axis=0) * routed[:, None].astype(out.dtype)


def _varying_axes(a) -> frozenset:
    """The shard_map axes `a` varies over (empty outside shard_map)."""
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _varying_like(init, *others):
    """`init` marked as varying over every shard_map axis any of `others` varies over (a loop carry must keep one
    type; inside shard_map the tiles vary over the axes of both the rows and the expert weights)."""
    missing = frozenset().union(*(_varying_axes(o) for o in others)) - _varying_axes(init)
    return jax.lax.pcast(init, tuple(sorted(missing)), to="varying") if missing else init


def _cotangent_for(ct, primal):
    """A cotangent summed over the shard_map axes along which its primal is the same on every device (each
    device's share of the gradient of a replicated input), so it has the primal's type."""
    extra = _varying_axes(ct) - _varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _tile_forward(x, g_w, u_w, d_w):
    g = jnp.dot(x, g_w, preferred_element_type=jnp.float32)
    u = jnp.dot(x, u_w, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(g) * u).astype(x.dtype)
    return g, u, a, jnp.dot(a, d_w, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _tiles_swiglu(buffer, gate, up, down, tile_expert, n_valid, tile: int):
    """buffer (n_tiles * tile, E); tile i (< n_valid) belongs to expert tile_expert[i]. Tiles >= n_valid stay 0."""
    return _tiles_forward(buffer, gate, up, down, tile_expert, n_valid, tile)


def _tiles_forward(buffer, gate, up, down, tile_expert, n_valid, tile):
    def body(i, out):
        x = jax.lax.dynamic_slice_in_dim(buffer, i * tile, tile)
        ex = tile_expert[i]
        *_, y = _tile_forward(x, gate[ex], up[ex], down[ex])
        return jax.lax.dynamic_update_slice_in_dim(out, y, i * tile, 0)

    # A while loop whose trip count is the number of non-empty tiles (data-dependent), not the static worst case.
    init = _varying_like(jnp.zeros_like(buffer), buffer, gate, up, down, tile_expert)
    return jax.lax.fori_loop(0, n_valid, body, init)


def _tiles_fwd(buffer, gate, up, down, tile_expert, n_valid, tile):
    out = _tiles_forward(buffer, gate, up, down, tile_expert, n_valid, tile)
    return out, (buffer, gate, up, down, tile_expert, n_valid)


def _tiles_bwd(tile, residuals, d_out):
    buffer, gate, up, down, tile_expert, n_valid = residuals
    f32 = jnp.float32

    def body(i, carry):
        d_buffer, d_gate, d_up, d_down = carry
        x = jax.lax.dynamic_slice_in_dim(buffer, i * tile, tile)
        dy = jax.lax.dynamic_slice_in_dim(d_out, i * tile, tile)
        ex = tile_expert[i]
        g_w, u_w, d_w = gate[ex], up[ex], down[ex]
        g, u, a, _ = _tile_forward(x, g_w, u_w, d_w)  # recomputed: nothing per tile was kept
        da = jnp.dot(dy, d_w.T, preferred_element_type=f32)
        sig = jax.nn.sigmoid(g)
        dg = (da * u * (sig * (1 + g * (1 - sig)))).astype(x.dtype)  # d silu(g) / dg = sig (1 + g (1 - sig))
        du = (da * g * sig).astype(x.dtype)
        dx = jnp.dot(dg, g_w.T, preferred_element_type=f32) + jnp.dot(du, u_w.T, preferred_element_type=f32)
        d_buffer = jax.lax.dynamic_update_slice_in_dim(d_buffer, dx.astype(d_buffer.dtype), i * tile, 0)
        d_gate = d_gate.at[ex].add(jnp.dot(x.T, dg, preferred_element_type=f32))
        d_up = d_up.at[ex].add(jnp.dot(x.T, du, preferred_element_type=f32))
        d_down = d_down.at[ex].add(jnp.dot(a.T, dy, preferred_element_type=f32))
        return d_buffer, d_gate, d_up, d_down

    init = (jnp.zeros_like(buffer), jnp.zeros(gate.shape, f32), jnp.zeros(up.shape, f32), jnp.zeros(down.shape, f32))
    init = tuple(_varying_like(z, buffer, gate, up, down, tile_expert, d_out) for z in init)
    d_buffer, d_gate, d_up, d_down = jax.lax.fori_loop(0, n_valid, body, init)
    return (_cotangent_for(d_buffer, buffer), _cotangent_for(d_gate.astype(gate.dtype), gate),
            _cotangent_for(d_up.astype(up.dtype), up), _cotangent_for(d_down.astype(down.dtype), down), None, None)


_tiles_swiglu.defvjp(_tiles_fwd, _tiles_bwd)
