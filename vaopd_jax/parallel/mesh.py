"""Device mesh with axes ('data', 'fsdp', 'expert', 'tensor') and multi-host initialization.

    mesh = make_mesh(data=-1, fsdp=1, tensor=1, expert=1)   # -1: all remaining devices
    maybe_initialize_distributed()                     # before any other JAX call on a multi-process launch
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
log = logging.getLogger(__name__)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None, *,
              expert: int = 1) -> Mesh:
    """A Mesh of shape (data, fsdp, expert, tensor) over `devices` (default: all devices of all processes).

    At most one size may be -1 (it takes the remaining devices). The product must equal the device count.
    `tensor` is the fastest-varying axis so tensor-parallel groups sit on neighbouring devices (one host /
    one NVLink or ICI island), `expert` the next (the MoE layers all-gather and reduce-scatter tokens over it).
    `expert` > 1 is expert parallelism for mixture-of-experts models (the experts of a layer split over it); for
    the dense parts it acts as one more data/fsdp axis (sharding.DEFAULT_RULES).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh {name}={size}: must be a positive int or -1 (all remaining devices)")
    unknown = [k for k, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {unknown}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if unknown:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes product {known} "
                             f"({sizes})")
        sizes[unknown[0]] = len(devices) // known
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape data*fsdp*expert*tensor = {shape} needs {int(np.prod(shape))} devices, "
                         f"but {len(devices)} are available")
    try:
        from jax.experimental import mesh_utils

        if devices == list(jax.devices()):
            grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
        else:
            grid = np.asarray(devices, dtype=object).reshape(shape)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process run.

    Recognized: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM (SLURM_NTASKS > 1),
    Cloud TPU pods (TPU_WORKER_HOSTNAMES with several hosts), Open MPI (OMPI_COMM_WORLD_SIZE > 1).
    On CPU, cross-process collectives go through gloo. Returns True when it initialized; a second call (the
    command line, then `train.run`) does nothing.
    """
    from jax._src import distributed

    if distributed.global_state.client is not None:
        return False
    env = os.environ
    coordinator = env.get("JAX_COORDINATOR_ADDRESS")
    multi = force or bool(coordinator)
    multi |= int(env.get("SLURM_NTASKS", "1")) > 1
    multi |= int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    multi |= len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if not multi:
        return False
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms == "cpu" or platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs = dict(coordinator_address=coordinator,
                      num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
                      process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialized: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


class on_mesh:  # noqa: N801  (used like a function: on_mesh(jitted, mesh))
    """A jitted function traced, lowered and run with `mesh` set (`jax.set_mesh`).

    The model's activation sharding constraints (`sharding.constrain`) read the mesh from the context; traced
    without it they are no-ops and GSPMD replicates e.g. the teacher's MLP activations on every device (about
    twice the paper-scale step's memory; docs/performance.md).
    The train step and the sampler both run this way.
    """

    def __init__(self, jitted, mesh: Mesh):
        self._jitted, self._mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self._mesh):
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self._mesh):
            return self._jitted.lower(*args, **kwargs)
