"""Which accelerator JAX found, said once at start-up, and a warning when a GPU/TPU config lands on CPU.

    info = backend_info()                                   # BackendInfo of this process
    line, warnings = startup_report(info, dtype="bfloat16", attention_impl="chunked", mesh_shape=(1, -1, 1),
                                    field_prefix="config.model.")
    # line: "devices: 8 x NVIDIA H100 80GB HBM3 in 1 process(es) (backend gpu, 8 local, jax 0.10.2)"

Why: `pip install -e .` gets CPU-only JAX, and a CUDA/TPU JAX whose plugin fails to load falls back to CPU
with a single log line. A paper config then runs for hours at CPU speed (or dies out of memory) before anyone
notices. The trainer and the evaluator call `startup_report` before loading any model.

The rule ("does this config expect an accelerator?"): any of
  - bfloat16 parameters / matmuls (on CPU XLA emulates bf16 dots; slower than float32),
  - attention_impl 'chunked' (exists to fit 4k-token responses in accelerator memory) or 'cudnn',
  - a mesh with a fixed axis > 1 (FSDP / tensor parallelism across devices).
If one holds and the backend is CPU, each reason is listed in one warning that also says how to install the
accelerator build. attention_impl 'cudnn' on anything but an NVIDIA GPU is an error (`BackendMismatch`):
jax.nn.dot_product_attention(implementation='cudnn') cannot run there.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import NamedTuple, Sequence

import jax

# pip distributions of JAX's accelerator plugins (what `pip install -e ".[cuda]"` / ".[tpu]" bring in).
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "jax-rocm7-plugin")
INSTALL_HINT = ('install the accelerator build of JAX: pip install -e ".[cuda]" (NVIDIA, CUDA 12 wheels), '
                '".[cuda13]" (NVIDIA, CUDA 13 drivers) or ".[tpu]" (Cloud TPU VM)')


class BackendMismatch(ValueError):
    """The config asks for something this backend cannot run (e.g. cuDNN attention without an NVIDIA GPU)."""


class BackendInfo(NamedTuple):
    """What JAX found in this process.

    platform: jax.default_backend() ('cpu' | 'gpu' | 'tpu' | ...); device_kind: of device 0 (e.g. 'NVIDIA H100
    80GB HBM3', 'TPU v5p', 'cpu'); num_devices / num_local_devices: global / this process's;
    process_count; jax_version; plugins: installed accelerator plugin distributions (name==version);
    jax_platforms: the JAX_PLATFORMS environment variable ('' when unset).
    """

    platform: str
    device_kind: str
    num_devices: int
    num_local_devices: int
    process_count: int
    jax_version: str
    plugins: tuple[str, ...]
    jax_platforms: str


def installed_plugins() -> tuple[str, ...]:
    """Accelerator plugin distributions installed in this environment, as 'name==version'."""
    found = []
    for name in ACCELERATOR_PLUGINS:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(found)


def backend_info() -> BackendInfo:
    """This process's JAX backend (initialises JAX's backends if they are not yet)."""
    devices = jax.devices()
    return BackendInfo(platform=jax.default_backend(), device_kind=devices[0].device_kind,
                       num_devices=len(devices), num_local_devices=jax.local_device_count(),
                       process_count=jax.process_count(), jax_version=jax.__version__,
                       plugins=installed_plugins(), jax_platforms=os.environ.get("JAX_PLATFORMS", ""))


def describe(info: BackendInfo) -> str:
    """One line: 'devices: N x KIND in P process(es) (backend B, L local, jax V)'."""
    return (f"devices: {info.num_devices} x {info.device_kind} in {info.process_count} process(es) "
            f"(backend {info.platform}, {info.num_local_devices} local, jax {info.jax_version})")


def accelerator_reasons(*, dtype: str | None = None, attention_impl: str | None = None,
                        mesh_shape: Sequence[int] = ()) -> list[str]:
    """Why a config expects a GPU/TPU (empty when nothing in it does); see the module docstring's rule.

    dtype: 'float32' | 'bfloat16' (None: not given); attention_impl: 'xla' | 'chunked' | 'cudnn';
    mesh_shape: the configured mesh sizes ((data, fsdp, expert, tensor) or (data, fsdp, tensor)), -1 = all
      remaining devices.
    """
    reasons = []
    if dtype is not None and str(dtype) == "bfloat16":
        reasons.append("bfloat16 weights and matmuls")
    if attention_impl in ("chunked", "cudnn"):
        reasons.append(f"attention_impl={attention_impl!r}")
    fixed = [int(s) for s in mesh_shape if int(s) > 1]
    if fixed:
        reasons.append(f"a multi-device mesh {tuple(int(s) for s in mesh_shape)}")
    return reasons


def startup_report(info: BackendInfo, *, dtype: str | None = None, attention_impl: str | None = None,
                   mesh_shape: Sequence[int] = (), field_prefix: str = "config.") -> tuple[str, list[str]]:
    """(the start-up line, warnings) for a run of this config on `info`'s backend.

    Raises BackendMismatch for attention_impl='cudnn' off an NVIDIA GPU, naming `field_prefix`attention_impl.
    """
    if attention_impl == "cudnn" and not (info.platform == "gpu" and info.device_kind.startswith("NVIDIA")):
        raise BackendMismatch(
            f"{field_prefix}attention_impl = 'cudnn' needs an NVIDIA GPU, but JAX's backend is {info.platform!r} "
            f"({info.device_kind}); use 'chunked' (any backend) or 'xla', or {INSTALL_HINT}")
    warnings = []
    reasons = accelerator_reasons(dtype=dtype, attention_impl=attention_impl, mesh_shape=mesh_shape)
    if info.platform == "cpu" and reasons:
        if info.jax_platforms.strip().lower().startswith("cpu"):
            why = f"JAX_PLATFORMS={info.jax_platforms!r} restricts JAX to the CPU"
        elif info.plugins:
            why = (f"{', '.join(info.plugins)} is installed but found no usable device (check nvidia-smi / the TPU "
                   "runtime, CUDA_VISIBLE_DEVICES, and the driver's CUDA version)")
        else:
            why = f"no GPU/TPU build of JAX is installed; {INSTALL_HINT}"
        warnings.append(f"this config is meant for GPUs/TPUs ({'; '.join(reasons)}) but JAX runs on the CPU: {why}. "
                        "It will be very slow here.")
    return describe(info), warnings
