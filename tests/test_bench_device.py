"""The accelerator check (`python -m vaopd_jax.bench.device`): its dry run runs every section on the CPU, and its
FLOP and byte model matches hand counts."""

import json
import math
import os
import subprocess
import sys

import pytest

from vaopd_jax.bench import device
from vaopd_jax.models import qwen3_vl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "device.json"
    # One CPU device; XLA's backend optimisation off halves the compile time (the figures are not the point here).
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, "-m", "vaopd_jax.bench.device", "--dry-run", "--repeats", "2",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for header in ("== 0. device (DRY RUN", "== 1. attention agreement", "== 2. prefill",
                   "== 3. fused train step", "== 4. decode", "== total"):
        assert header in proc.stdout, header
    assert "cuDNN attention needs an NVIDIA GPU; not measured on cpu" in proc.stdout
    r = json.loads(out.read_text())
    assert r["skipped"] == []
    assert r["device"]["platform"] == "cpu" and r["device"]["peak_tflops"] == device.NOMINAL_TFLOPS
    # bf16 kernels against the fp32 reference: small, nonzero errors; the chunked kernel agrees.
    for name, errs in r["agreement"]["kernel_errors"].items():
        assert all(0 < e < 0.05 for e in errs.values()), (name, errs)
    assert r["agreement"]["agrees"] == {"chunked": True}
    assert 0 < r["agreement"]["model_errors"]["chunked"] < 0.2
    assert r["prefill"]["chunked"]["tokens_per_s"] > 0 and 0 < r["prefill"]["chunked"]["mfu"] < 1
    assert math.isfinite(r["step"]["loss"]) and r["step"]["seconds"] > 0 and 0 < r["step"]["mfu"] < 1
    assert r["step"]["peak_bytes"] > 0
    assert r["decode"]["tokens_per_s"] > 0 and 0 < r["decode"]["fraction"] < 1


def test_budget_skips_the_remaining_sections(capsys):
    r = device.main(["--dry-run", "--budget-s", "0", "--sections", "decode"])
    assert r["skipped"] == ["decode"] and "decode" not in r
    assert "== 4. decode: SKIPPED" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown section 'nope'"):
        device.main(["--dry-run", "--sections", "nope"])


def test_flops_and_bytes_match_hand_counts():
    cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b()
    t = cfg.text  # 2048 wide, 6144 MLP, 28 layers, 16 heads / 8 KV heads of 128
    per_layer = 2048 * (16 + 2 * 8) * 128 + 16 * 128 * 2048 + 3 * 2048 * 6144
    assert device.text_matmul_params(cfg) == 28 * per_layer
    text_only = device.forward_flops(cfg, [100, 50], logit_positions=2)
    expected = 2 * 28 * per_layer * 150 + 2 * 28 * 16 * 128 * (100**2 + 50**2) + 2 * 2048 * t.vocab_size * 2
    assert text_only == pytest.approx(expected, rel=1e-12)
    # A 32 x 32-patch image: 24 blocks of 1024 wide (MLP 4096), 1024 patches, 256 merged tokens, 4 mergers.
    v = cfg.vision
    block = 4 * 1024**2 + 2 * 1024 * 4096
    merger = 4096 * 4096 + 4096 * 2048
    vision = 2 * 1024 * (v.patch_dim * 1024 + 24 * block) + 2 * 256 * 4 * merger + 24 * 4 * 1024**2 * 1024
    assert device.vision_flops(cfg, [1024]) == pytest.approx(vision, rel=1e-12)
    weights, kv = device.decode_bytes_per_step(cfg, rows=64, mean_context=1280.0)
    assert weights == 2 * (28 * per_layer + 2048 * t.vocab_size)
    assert kv == 2 * 28 * 64 * 8 * 128 * 1280 * 2
    # The 2B's matmul parameters are ~1.4B of its ~1.7B text parameters (the rest is the tied embedding).
    assert 1.3e9 < device.text_matmul_params(cfg) < 1.5e9
    assert device.si(1.234e12, "FLOP") == "1.23 TFLOP" and device.si(512, "B") == "512 B"
