"""Compile targets: the GPUs and TPUs the project compiles for on a host that has none of them.

    from vaopd_jax.parallel import targets
    target = targets.get("h100x8")                  # or a100x8, v5p-8, v6e-8, v5e-8, cpu, multi-host variants
    mesh = targets.make_mesh(target, fsdp=-1)       # a Mesh over the target's devices (no hardware needed)
    compiled = jitted.lower(*sharded_shape_dtype_structs).compile()
    mem = targets.program_memory(compiled, target)  # per-device bytes, peak, fits / margin, FLOPs, bytes
    print(targets.report_line("train step", mem))   # '... peak 23.10 GB ...': one line a script can parse

How: `jax.experimental.topologies.get_topology_desc` describes a TPU slice (libtpu, the `compile-tpu` extra)
or a set of NVIDIA GPUs (the CUDA plugin and a `GpuTargetConfigProto` shipped in target_configs/, the
`compile-cuda12` extra); a Mesh over its devices and `ShapeDtypeStruct`s carrying NamedShardings over that
mesh lower and compile the real program with the real target compiler, which reports its memory analysis.
The 'cpu' target is XLA's CPU backend over simulated host devices (`--xla_force_host_platform_device_count`):
its figures are CPU figures (it has no bf16 matmul and converts bf16 weights to f32, about 2x the GPU's peak).

Caveats: the GPU compiler compiles a program larger than the card without complaint (`program_memory` compares
the peak against the card's HBM), runs no autotuning and returns no `cost_analysis()` (FLOPs / bytes are then
None: use a TPU compile of the same program or an analytic count). `lower(lowering_platforms=("cuda",))` on a
CPU-only JAX compiles for the CPU: the device kind printed by `report_line` is the one the compiler targeted.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from importlib import resources

import jax
from jax.sharding import Mesh

from vaopd_jax.parallel import mesh as mesh_lib

# The CUDA plugin refuses to start without a CUDA driver unless told this (it only compiles here).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# Two processes compiling for TPU at once (e.g. tests in parallel) each load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GB = 1e9
# Share of the card's HBM a program may use: the rest is for what XLA's analysis does not see (allocator
# fragmentation, collective and cuDNN workspaces, the runtime's own reservations).
HEADROOM = 0.10


@dataclasses.dataclass(frozen=True)
class Target:
    """One compile target. Per-device figures from the vendor's data sheet (`source`)."""

    name: str
    platform: str  # 'cuda' | 'tpu' | 'cpu'
    card: str  # what the vendor calls one device
    num_devices: int
    hosts: int
    hbm_bytes: float  # per device
    peak_bf16_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s per device
    topology: str = ""  # TPU: libtpu topology name; GPU: '<slices>x<hosts>x<gpus per host>'
    chips_per_host: tuple[int, int, int] | None = None  # TPU single-host slices: every chip in one process
    target_config: str = ""  # GPU: file in target_configs/
    source: str = ""

    @property
    def budget_bytes(self) -> float:
        """What one program may use per device: HBM less HEADROOM."""
        return self.hbm_bytes * (1 - HEADROOM)

    @property
    def label(self) -> str:
        hosts = f", {self.hosts} hosts" if self.hosts > 1 else ""
        return f"{self.name} ({self.num_devices} x {self.card}{hosts})"


_H100 = dict(platform="cuda", card="NVIDIA H100 80GB HBM3 (SXM5)", hbm_bytes=84_929_347_584,
             peak_bf16_flops=989.4e12, hbm_bandwidth=3.35e12, target_config="h100-80gb.txtpb",
             source="NVIDIA H100 data sheet: SXM5, 989.4 TFLOP/s dense bf16, 3.35 TB/s, 80 GB (84,929,347,584 "
                    "bytes as the driver reports)")
_A100 = dict(platform="cuda", card="NVIDIA A100-SXM4-80GB", hbm_bytes=85_899_345_920,
             peak_bf16_flops=312e12, hbm_bandwidth=2.039e12, target_config="a100-80gb.txtpb",
             source="NVIDIA A100 data sheet: SXM4 80GB, 312 TFLOP/s dense bf16, 2,039 GB/s, 80 GB (81,920 MiB)")
# Cloud TPU system architecture pages (per chip): v5p 95 GB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s; v6e (Trillium)
# 32 GB, 918 TFLOP/s, 1,640 GB/s; v5e 16 GB, 197 TFLOP/s, 819 GB/s. A v5p slice name counts TensorCores (2 per
# chip: v5p-8 = 4 chips); v5e / v6e names count chips.
_V5P = dict(platform="tpu", card="TPU v5p", hbm_bytes=95e9, peak_bf16_flops=459e12, hbm_bandwidth=2.765e12,
            source="Cloud TPU v5p: 95 GB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s per chip; v5p-N = N/2 chips")
_V6E = dict(platform="tpu", card="TPU v6e", hbm_bytes=32e9, peak_bf16_flops=918e12, hbm_bandwidth=1.64e12,
            source="Cloud TPU v6e: 32 GB HBM, 918 TFLOP/s bf16, 1,640 GB/s per chip")
_V5E = dict(platform="tpu", card="TPU v5e", hbm_bytes=16e9, peak_bf16_flops=197e12, hbm_bandwidth=8.19e11,
            source="Cloud TPU v5e: 16 GB HBM2, 197 TFLOP/s bf16, 819 GB/s per chip")


def _gpu(name, spec, hosts):
    return Target(name=name, num_devices=8 * hosts, hosts=hosts, topology=f"1x{hosts}x8", **spec)


def _tpu(name, spec, topology, chips, hosts, single_host_bounds=None):
    return Target(name=name, num_devices=chips, hosts=hosts, topology=topology,
                  chips_per_host=single_host_bounds, **spec)


TARGETS: dict[str, Target] = {t.name: t for t in [
    _gpu("h100x8", _H100, 1), _gpu("h100x16", _H100, 2), _gpu("h100x32", _H100, 4),
    _gpu("a100x8", _A100, 1), _gpu("a100x16", _A100, 2), _gpu("a100x32", _A100, 4),
    _tpu("v5p-8", _V5P, "v5p:2x2x1", 4, 1), _tpu("v5p-16", _V5P, "v5p:2x2x2", 8, 2),
    _tpu("v5p-32", _V5P, "v5p:2x2x4", 16, 4), _tpu("v5p-64", _V5P, "v5p:2x4x4", 32, 8),
    _tpu("v6e-8", _V6E, "v6e:2x4", 8, 1, (2, 4, 1)), _tpu("v6e-16", _V6E, "v6e:4x4", 16, 4),
    _tpu("v6e-32", _V6E, "v6e:4x8", 32, 8), _tpu("v6e-64", _V6E, "v6e:8x8", 64, 16),
    _tpu("v5e-8", _V5E, "v5e:2x4", 8, 1, (2, 4, 1)), _tpu("v5e-16", _V5E, "v5e:4x4", 16, 4),
    _tpu("v5e-32", _V5E, "v5e:4x8", 32, 8), _tpu("v5e-64", _V5E, "v5e:8x8", 64, 16),
    Target(name="cpu", platform="cpu", card="XLA CPU backend, simulated devices (80 GB budget as an A100/H100)",
           num_devices=8, hosts=1, hbm_bytes=80e9, peak_bf16_flops=0.0, hbm_bandwidth=0.0,
           source="today's CPU-backend AOT: upper bounds, bf16 weights converted to f32"),
]}


class MissingExtra(RuntimeError):
    """The target's compiler is not installed; the message is the one line naming the pip install."""


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"--target {name!r}: unknown; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def _install_line(target: Target) -> str:
    version = jax.__version__
    if target.platform == "tpu":
        return (f"target {target.name} needs libtpu to compile for {target.card}: pip install \"jax[tpu]=={version}\" "
                f"(or pip install -e \".[compile-tpu]\")")
    return (f"target {target.name} needs JAX's CUDA plugin to compile for {target.card}: pip install "
            f"\"jax[cuda12-local]=={version}\" (compile only, ~180 MB; or pip install -e \".[compile-cuda12]\"; "
            f"\"jax[cuda12]=={version}\" to also run on GPUs)")


def available(target: Target) -> bool:
    """Whether this environment has the target's compiler (libtpu / the CUDA 12 plugin)."""
    if target.platform == "cpu":
        return True
    module = "libtpu" if target.platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def target_config_text(filename: str) -> str:
    """A GpuTargetConfigProto text shipped with the package (target_configs/)."""
    return resources.files("vaopd_jax.parallel").joinpath("target_configs", filename).read_text()


@functools.lru_cache(maxsize=None)
def devices(name: str) -> tuple:
    """The target's devices: topology devices to compile for (no hardware), or simulated CPU devices."""
    target = get(name)
    if target.platform == "cpu":
        cpus = jax.devices("cpu")
        if len(cpus) < target.num_devices:
            raise RuntimeError(f"target cpu: {len(cpus)} CPU devices, needs {target.num_devices}; set XLA_FLAGS="
                               f"--xla_force_host_platform_device_count={target.num_devices} before JAX starts")
        return tuple(cpus[:target.num_devices])
    if not available(target):
        raise MissingExtra(_install_line(target))
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            kwargs = {"chips_per_host_bounds": list(target.chips_per_host)} if target.chips_per_host else {}
            topo = topologies.get_topology_desc(target.topology, "tpu", **kwargs)
        else:
            topo = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                target_config=target_config_text(target.target_config))
    except Exception as e:  # noqa: BLE001 - a plugin of another JAX version fails here with its own message
        raise MissingExtra(f"{_install_line(target)}; the installed one failed: {str(e).splitlines()[0][:200]}") from e
    found = tuple(topo.devices)
    if len(found) != target.num_devices:
        raise RuntimeError(f"target {target.name}: topology {target.topology!r} has {len(found)} devices, "
                           f"expected {target.num_devices}")
    return found


def make_mesh(target: Target | str, *, data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1) -> Mesh:
    """A ('data', 'fsdp', 'expert', 'tensor') Mesh over the target's devices (parallel.mesh.make_mesh)."""
    target = get(target) if isinstance(target, str) else target
    return mesh_lib.make_mesh(data=data, fsdp=fsdp, tensor=tensor, expert=expert,
                              devices=list(devices(target.name)))


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """What the target compiler reports for one compiled program, per device (bytes)."""

    target: Target
    device_kind: str
    arguments: int
    outputs: int
    aliased: int
    temp: int
    code: int
    flops: float | None  # None: the compiler gives no cost analysis (the GPU compiler)
    bytes_accessed: float | None
    # The TPU compiler refuses a program larger than the chip's HBM: then only the total it reports is known.
    refused_peak: int | None = None
    refusal: str = ""

    @property
    def peak(self) -> int:
        """arguments + outputs - aliased (donated buffers reused) + temp + code."""
        if self.refused_peak is not None:
            return self.refused_peak
        return self.arguments + self.outputs - self.aliased + self.temp + self.code

    @property
    def fits(self) -> bool:
        return self.peak <= self.target.budget_bytes

    @property
    def margin(self) -> float:
        """Bytes left under the budget (negative: over it)."""
        return self.target.budget_bytes - self.peak


def _cost(compiled) -> tuple[float | None, float | None]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None, None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None, None
    flops, accessed = cost.get("flops"), cost.get("bytes accessed")
    return (float(flops) if flops is not None and flops >= 0 else None,
            float(accessed) if accessed is not None and accessed >= 0 else None)


def program_memory(compiled, target: Target) -> ProgramMemory:
    """The compiled program's per-device memory analysis and cost analysis, against the target's card."""
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"target {target.name}: the compiler returned no memory analysis")
    shardings = jax.tree.leaves(compiled.input_shardings)
    kinds = {d.device_kind for s in shardings for d in s.device_set} if shardings else set()
    kind = ", ".join(sorted(kinds)) or devices(target.name)[0].device_kind
    flops, accessed = _cost(compiled)
    return ProgramMemory(target=target, device_kind=kind, arguments=int(mem.argument_size_in_bytes),
                         outputs=int(mem.output_size_in_bytes), aliased=int(mem.alias_size_in_bytes),
                         temp=int(mem.temp_size_in_bytes), code=int(mem.generated_code_size_in_bytes),
                         flops=flops, bytes_accessed=accessed)


_OOM = re.compile(r"Used ([0-9.]+)([KMGT])? of ([0-9.]+)([KMGT])? hbm")
_UNITS = {None: 1, "": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused(error: Exception, target: Target) -> ProgramMemory | None:
    """A ProgramMemory that does not fit, from the compiler's out-of-memory refusal (TPU: 'Used 45.2G of
    31.25G hbm'); None when `error` is not one."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    match = _OOM.search(text)
    used = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else int(target.hbm_bytes) + 1
    kind = devices(target.name)[0].device_kind
    first = next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
    return ProgramMemory(target=target, device_kind=kind, arguments=0, outputs=0, aliased=0, temp=0, code=0,
                         flops=None, bytes_accessed=None, refused_peak=max(used, int(target.budget_bytes) + 1),
                         refusal=first[:300])


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def report_line(program: str, mem: ProgramMemory) -> str:
    """One line per program; scripts parse `peak <X> GB` from it."""
    t = mem.target
    if mem.refused_peak is not None:
        return (f"{program} [{t.name}: {mem.device_kind}]: the compiler refused it -> peak {mem.peak / GB:.2f} GB; "
                f"does NOT fit the {t.hbm_bytes / GB:.1f} GB card ({mem.refusal})")
    verdict = (f"fits the {t.hbm_bytes / GB:.1f} GB card with {_gb(mem.margin)} to spare (budget "
               f"{t.budget_bytes / GB:.1f} GB = HBM less {HEADROOM:.0%})" if mem.fits else
               f"does NOT fit the {t.hbm_bytes / GB:.1f} GB card: {_gb(-mem.margin)} over the {t.budget_bytes / GB:.1f} "
               f"GB budget (HBM less {HEADROOM:.0%})")
    cost = (f"FLOPs {mem.flops:.3e}, bytes accessed {mem.bytes_accessed:.3e}" if mem.flops is not None else
            "FLOPs / bytes accessed: not reported by this compiler")
    return (f"{program} [{t.name}: {mem.device_kind}]: per device arguments {_gb(mem.arguments)}, outputs "
            f"{_gb(mem.outputs)}, aliased {_gb(mem.aliased)}, temp {_gb(mem.temp)}, code {_gb(mem.code)} -> "
            f"peak {mem.peak / GB:.2f} GB; {verdict}; {cost}")
