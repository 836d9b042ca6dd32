"""Deviceless compiles for a real TPU topology and a real NVIDIA GPU target (vaopd_jax/parallel/targets.py):
the tiny train step and a decode step compile with the target compiler, report a positive per-device memory
analysis, and an over-sized program is reported as not fitting. Needs the `compile` extra (libtpu and JAX's
CUDA plugin); without it these tests skip, and fail under CI (env CI set)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaopd_jax.bench import aot, sample
from vaopd_jax.bench import step as step_bench
from vaopd_jax.models import qwen3_vl
from vaopd_jax.parallel import targets

TPU, GPU = "v5e-8", "h100x8"


def require(name: str) -> targets.Target:
    """The target, its devices built; a skip when its extra is missing, a failure under CI."""
    target = targets.get(name)
    try:
        targets.devices(name)
    except targets.MissingExtra as e:
        if os.environ.get("CI"):
            pytest.fail(f"the compile extras are required when CI is set: {e}")
        pytest.skip(str(e))
    return target


def small_config():
    return qwen3_vl.Qwen3VLConfig.tiny(text=dict(num_hidden_layers=2),
                                       vision=dict(depth=1, deepstack_visual_indexes=(0,)))


def _check(mem: targets.ProgramMemory, target: targets.Target, kind: str):
    assert mem.device_kind == kind  # the compiler targeted the card, not the host CPU
    assert mem.arguments > 0 and mem.temp > 0 and mem.peak > 0
    assert mem.peak == mem.arguments + mem.outputs - mem.aliased + mem.temp + mem.code
    assert mem.fits and 0 < mem.margin < target.budget_bytes
    line = targets.report_line("program", mem)
    assert f"peak {mem.peak / 1e9:.2f} GB" in line and kind in line


@pytest.mark.parametrize("name,kind", [(TPU, "TPU v5 lite"), (GPU, "NVIDIA H100 80GB HBM3")])
def test_tiny_train_step_compiles_for_target(name, kind):
    target = require(name)
    mesh = targets.make_mesh(target, fsdp=-1)
    cfg = small_config()
    lower = step_bench.train_step_lowering(cfg, cfg, mesh, num_prompts=8, num_rollouts=2, prompt_len=32,
                                           response_len=16, image_tokens=4, kl_chunk_size=8, vocab_valid=None)
    mem, compiled, _, _ = aot.compile_program("train step", lower, target, quiet=True)
    _check(mem, target, kind)
    assert mem.aliased > 0  # the donated train state is reused in place
    if target.platform == "tpu":
        assert mem.flops > 0 and mem.bytes_accessed > 0
    # The same program against a card too small for it: reported as not fitting, not an error.
    small = dataclasses.replace(target, hbm_bytes=mem.peak / 2)
    over = targets.program_memory(compiled, small)
    assert not over.fits and over.margin < 0
    assert "does NOT fit" in targets.report_line("train step", over)


@pytest.mark.parametrize("name,kind", [(TPU, "TPU v5 lite"), (GPU, "NVIDIA H100 80GB HBM3")])
def test_tiny_decode_step_compiles_for_target(name, kind):
    target = require(name)
    mesh = targets.make_mesh(target, fsdp=-1)
    cfg = small_config()
    lowerings, shape = sample.rollout_lowerings(cfg, mesh, num_prompts=8, num_samples=2, prompt_len=32,
                                                image_tokens=4, max_new_tokens=32, valid_vocab=None)
    mem, _, _, _ = aot.compile_program("decode step", lowerings["decode"], target, quiet=True)
    _check(mem, target, kind)
    # Arguments: the fp32 params' and the bf16 cache's per-device shares (the cache is donated: aliased).
    t = cfg.text
    cache = 2 * t.num_hidden_layers * shape["rows"] * t.num_key_value_heads * (shape["context"] + 1) * t.head_dim * 2
    assert mem.aliased >= 0.9 * cache / mesh.size


def test_program_over_the_card_is_reported_not_fitting_on_both_compilers():
    """A 20 GB output on a 16 GB TPU v5e: libtpu refuses to compile it (parsed into 'does not fit'); the GPU
    compiler compiles a 100 GB output for an 80 GB H100 (compared against the card)."""
    for name, gigabytes in ((TPU, 20), (GPU, 100)):
        target = require(name)
        devices = np.asarray(targets.devices(name)[:1])
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("x",)), jax.sharding.PartitionSpec())
        n = gigabytes * 10**9 // 4
        fn = jax.jit(lambda x: jnp.broadcast_to(x, (n,)) + 1.0, out_shardings=sharding)
        mem, *_ = aot.compile_program(f"{gigabytes} GB", lambda: fn.lower(  # noqa: B023
            jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)), target, quiet=True)
        assert not mem.fits and mem.peak > target.hbm_bytes
        assert "does NOT fit" in targets.report_line("big", mem)


def test_missing_extra_names_the_pip_install(monkeypatch):
    monkeypatch.setattr(targets, "available", lambda target: False)
    targets.devices.cache_clear()
    try:
        for name, extra in (("v6e-8", "jax[tpu]=="), ("a100x8", "jax[cuda12-local]==")):
            with pytest.raises(targets.MissingExtra, match="pip install") as info:
                targets.devices(name)
            assert extra + jax.__version__ in str(info.value) and "\n" not in str(info.value)
    finally:
        targets.devices.cache_clear()


def test_targets_table():
    assert {"h100x8", "a100x8", "v5p-8", "v6e-8", "v5e-8", "cpu"} <= set(targets.TARGETS)
    assert targets.get("v5p-8").num_devices == 4  # v5p slices count TensorCores, two per chip
    assert targets.get("h100x32").hosts == 4
    with pytest.raises(ValueError, match="unknown; choose from"):
        targets.get("h100")
    for filename in ("h100-80gb.txtpb", "a100-80gb.txtpb"):  # package data: works from an install
        assert "gpu_device_info" in targets.target_config_text(filename)
