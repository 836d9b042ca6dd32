"""Multi-process helpers of the trainer: one place for what crosses processes.

    primary()                          # process 0 writes logs and exports
    say("...")                         # a console line, printed by process 0 only
    sync("name")                       # barrier across processes
    allgather_rows({"ids": a, ...})    # per-process arrays (rows first) -> all processes' rows, padded alike
    allgather_strings(values)          # per-process string arrays -> all processes' strings
    to_global(tree, shardings)         # identical process-local values -> global jax.Arrays
    host(x)                            # a (possibly multi-process) global array -> numpy on every process

With one process every helper is the identity (or a plain conversion); nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def primary() -> bool:
    """Whether this is process 0 (the one that writes logs, checkpoints' metadata and exports)."""
    return jax.process_index() == 0


def say(message: str) -> None:
    """Prints a console line on process 0 only (the others stay quiet)."""
    if primary():
        print(message, flush=True)


def sync(name: str) -> None:
    """A barrier named `name` across all processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_rows(arrays: Mapping[str, np.ndarray], fills: Mapping[str, float] | None = None) -> dict:
    """All processes' rows of each array, concatenated in process order (the same result on every process).

    Each array has its rows on axis 0; its other axes may differ between processes (e.g. each process pads to
    its own bucket): every array is padded to the widest process's shape with its fill value (`fills`, default
    0) before the all-gather, and each process's real rows are kept.
    """
    if jax.process_count() == 1:
        return dict(arrays)
    from jax.experimental import multihost_utils

    fills = dict(fills or {})
    names = list(arrays)
    local = [np.asarray(arrays[k]) for k in names]
    # Every process's shapes: (processes, sum of ndims), then the widest shape per array.
    dims = np.concatenate([np.asarray(a.shape, np.int64) for a in local])
    shapes = np.asarray(multihost_utils.process_allgather(dims)).reshape(jax.process_count(), -1)
    out, start = {}, 0
    for name, value in zip(names, local):
        per_process = shapes[:, start:start + value.ndim]
        start += value.ndim
        widest = per_process.max(0)
        padded = np.pad(value, [(0, int(w) - s) for w, s in zip(widest, value.shape)],
                        constant_values=np.asarray(fills.get(name, 0)).astype(value.dtype))
        gathered = np.asarray(multihost_utils.process_allgather(padded))  # (processes, *widest)
        out[name] = np.concatenate([gathered[p, :int(per_process[p, 0])] for p in range(jax.process_count())], 0)
    return out


def allgather_strings(values) -> np.ndarray:
    """All processes' string arrays concatenated in process order (UTF-8 bytes through an all-gather)."""
    if jax.process_count() == 1:
        return np.asarray(values, dtype=np.str_)
    encoded = [str(v).encode("utf-8") for v in values]
    width = max([len(e) for e in encoded] + [1])
    local = np.zeros((len(encoded), width), np.uint8)
    for i, e in enumerate(encoded):
        local[i, :len(e)] = np.frombuffer(e, np.uint8)
    rows = allgather_rows({"bytes": local})["bytes"]
    return np.array([bytes(r).rstrip(b"\0").decode("utf-8") for r in rows], dtype=np.str_)


def to_global(tree, shardings):
    """Process-local values (identical on every process) -> global arrays with `shardings`.

    `shardings`: one Sharding for every leaf, or a prefix of `tree` (e.g. one NamedSharding per nnx.Param node).
    """
    def one(x, sharding):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        value = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: one(x, sharding), sub), shardings, tree)


def host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
