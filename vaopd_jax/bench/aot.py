"""Shared pieces of the ahead-of-time (deviceless) compiles: abstract sharded parameters and one report line
per compiled program. The targets (GPUs, TPUs, the CPU backend) are vaopd_jax/parallel/targets.py."""

from __future__ import annotations

import contextlib
import functools
import time

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import sharding as model_sharding
from vaopd_jax.parallel import targets as targets_lib


def abstract_model(cfg, param_dtype, compute_dtype, remat, mesh):
    """(graphdef, Param state of ShapeDtypeStructs carrying their NamedShardings over `mesh`): no weights."""
    model = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                                    rngs=nnx.Rngs(0), remat=remat))
    graphdef, state = nnx.split(model, nnx.Param)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    leaves, treedef = jax.tree.flatten(state)  # one ShapeDtypeStruct inside each Param
    specs = [model_sharding.logical_to_spec(v.get_metadata()["logical_axes"], None, mesh, v.shape)
             for v in variables]
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
                for x, spec in zip(leaves, specs)]
    return graphdef, jax.tree.unflatten(treedef, abstract)


def sds(mesh, shape, dtype, axes=None):
    """A ShapeDtypeStruct sharded by logical axes (None: replicated)."""
    spec = PartitionSpec() if axes is None else model_sharding.logical_to_spec(axes, mesh=mesh, shape=shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


@contextlib.contextmanager
def unrolled_scans():
    """Traces with every `jax.lax.scan` fully unrolled. XLA's cost analysis (the TPU compiler's) counts a loop
    body once whatever its trip count, so the bytes of a program that scans its layers cover one layer; a program
    traced in this context has no layer loop and its byte count covers every layer."""
    original = jax.lax.scan
    jax.lax.scan = functools.partial(original, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = original


def compile_program(name: str, lower, target: targets_lib.Target, *, quiet: bool = False):
    """Lowers (`lower()` -> jax.stages.Lowered) and compiles one program for `target`; prints its report line.
    Returns (ProgramMemory, compiled or None when the compiler refused it, seconds to lower, seconds to compile)."""
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - an over-sized program is a 'does not fit', not a crash
        mem = targets_lib.refused(e, target)
        if mem is None:
            raise
        compiled = None
    t2 = time.perf_counter()
    if compiled is not None:
        mem = targets_lib.program_memory(compiled, target)
    if not quiet:
        print(f"  {targets_lib.report_line(name, mem)} (lower {t1 - t0:.0f} s, compile {t2 - t1:.0f} s)", flush=True)
    return mem, compiled, t1 - t0, t2 - t1
