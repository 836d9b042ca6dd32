"""Small building blocks shared by the vision tower and the text decoder (pure functions + a Param maker).

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension); sharding.py maps
those names onto mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str, ...], dtype, init: str = "normal", std: float = 0.02):
    """An nnx.Param of `shape` with logical axis names `axes` (len(axes) == len(shape)).

    init: 'normal' (N(0, std), as transformers' `_init_weights`), 'ones' (norm scales), 'zeros' (biases).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    if init == "normal":
        key = rngs.params()
        if isinstance(key, jax.core.Tracer):  # under nnx.eval_shape / jit: stays abstract
            value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
        else:
            # Eager init draws on the host: jax.random.normal would compile one XLA program per distinct shape
            # (seconds each on CPU), dominating model construction in tests.
            seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel()
            host = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
            value = jnp.asarray(std * host, dtype=dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}; expected normal/ones/zeros")
    return nnx.Param(value, logical_axes=tuple(axes))


def rms_norm(x, scale, eps: float):
    """Qwen3 RMSNorm: statistics in fp32, result cast back to x.dtype, then times the scale."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm with bias, statistics in fp32, result in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def dense(x, kernel, bias=None, dtype=None):
    """x (..., In) @ kernel (In, Out) [+ bias] in `dtype` (default x.dtype)."""
    dtype = dtype or x.dtype
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def gelu(x, approximate: bool):
    return jax.nn.gelu(x, approximate=approximate)


def maybe_remat(fn, policy: str):
    """Wraps a per-block function for rematerialization ('none' | 'block')."""
    if policy == "none":
        return fn
    if policy == "block":
        return jax.checkpoint(fn, prevent_cse=False)
    raise ValueError(f"remat must be 'none' or 'block', got {policy!r}")
