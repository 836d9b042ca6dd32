"""vaopd_jax.study: the table's statistics, the time-to-accuracy rule, and one end-to-end `--quick` study."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from runtime_env import runtime_env
from vaopd_jax import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(fine, coarse=1.0, va=0.0):
    return {"val/accuracy_fine": fine, "val/accuracy_coarse": coarse, "val/accuracy": (fine + coarse) / 2,
            "val/student_va_mean": va}


def test_mean_interval_is_students_t():
    mean, half = study.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-4)
    assert study.mean_interval([0.5]) == (0.5, 0.0)
    assert study.mean_interval([0.2, 0.2, 0.2])[1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        study.mean_interval([])


def test_summary_table_and_steps_to_opds_final_accuracy():
    runs = {
        "opd": {0: {0: _record(0.3), 10: _record(0.4), 20: _record(0.5)},
                1: {0: _record(0.3), 10: _record(0.5), 20: _record(0.7)}},  # final fine: mean 0.6
        "va_opd": {0: {0: _record(0.3), 10: _record(0.6), 20: _record(0.8)},
                   1: {0: _record(0.3), 10: _record(0.4), 20: _record(0.6)}},
        "group_only": {0: {0: _record(0.3), 10: _record(0.3), 20: _record(0.4)},
                       1: {0: _record(0.3), 10: _record(0.3), 20: _record(0.3)}},
    }
    summary = study.summarize(runs)
    assert summary["target"] == pytest.approx(0.6)
    assert summary["table"]["opd"][20]["fine"] == pytest.approx((0.6, 12.706 * 0.1414214 / 2 ** 0.5), rel=1e-4)
    assert summary["table"]["va_opd"][10]["overall"][0] == pytest.approx((0.8 + 0.7) / 2)
    reach = summary["steps_to_target"]
    assert reach["va_opd"] == {"per_seed": {0: 10, 1: 20}, "mean": 15.0, "reached": 2}
    assert reach["opd"] == {"per_seed": {0: None, 1: 20}, "mean": 20.0, "reached": 1}
    assert reach["group_only"]["mean"] is None and reach["group_only"]["reached"] == 0
    table = study.markdown(summary, [0, 1])
    assert "| VA-OPD | 0.700 ± " in table and "| group only | not reached | 0: –, 1: – |" in table
    assert "| VA-OPD | 15.0 (2/2) | 0: 10, 1: 20 |" in table


def test_quick_study_end_to_end(tmp_path):
    workdir = tmp_path / "study"
    env = runtime_env()
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "JAX_COMPILATION_CACHE_DIR": os.environ.get("VAOPD_TEST_JAX_CACHE") or str(tmp_path / "cache")})
    proc = subprocess.run(
        [sys.executable, "-m", "vaopd_jax.study", "--config", os.path.join(REPO, "configs", "study.py"), "--quick",
         f"--config.study.workdir={workdir}", "--config.study.methods=opd,va_opd", "--config.study.seeds=0,1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["methods"] == ["opd", "va_opd"] and results["quick"]
    for method in ("opd", "va_opd"):
        for seed in ("0", "1"):
            steps = results["runs"][method][seed]
            assert sorted(steps, key=int) == ["0", "2"]  # validation before training and at the last step
            assert 0.0 <= steps["2"]["val/accuracy_fine"] <= 1.0
        assert set(results["table"][method]["2"]) == {"fine", "coarse", "overall", "student VA"}
    assert results["target"] is not None and set(results["steps_to_target"]) == {"opd", "va_opd"}
    # one teacher and one student warm-up for all four runs
    assert (workdir / "teacher_sft" / "SFT_DONE").is_file() and (workdir / "student_sft" / "SFT_DONE").is_file()
    assert not (workdir / "opd" / "seed_0" / "teacher_sft").exists()
    table = (workdir / "table.md").read_text()
    assert "| OPD |" in table and "| VA-OPD |" in table and "steps to reach OPD's final" in table
    assert Image.open(workdir / "curves.png").size == (600, 400)
    assert "study: opd seed 0" in proc.stdout
    # a second call reuses the finished runs
    again = subprocess.run(proc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "study: opd seed 0" not in again.stdout
