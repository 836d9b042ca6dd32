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


def _fake_runner(calls):
    """A run_one stand-in: writes the files a finished trainer run leaves (validation and train records)."""
    def runner(config_file, run, run_dir, *, env=None, echo=False):
        calls.append((run.method, run.seed, run.point))
        gain = {"opd": 0.1, "va_opd": 0.2}[run.method] * (1 + (run.point or 0) / 100) + 0.01 * run.seed
        records = [{"kind": "val", "step": st, **_record(min(1.0, 0.3 + gain * st / 10))} for st in (0, 10, 20)]
        records += [{"kind": "train", "step": st, "train/loss_critical_share": 0.1 * st / 20,
                     "train/va_top_share": 0.9, "train/loss": 1.0} for st in (1, 10, 20)]
        os.makedirs(os.path.join(run_dir, "export", "final"), exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")
        with open(os.path.join(run_dir, "export", "final", "config.json"), "w") as f:
            f.write("{}")
    return runner


def _study_config(workdir, **fields):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_config", os.path.join(REPO, "configs", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.study.workdir = str(workdir)
    config.study.methods, config.study.seeds = ("opd", "va_opd"), (0, 1)
    config.study.num_steps, config.study.eval_every = 20, 10
    for name, value in fields.items():
        if name == "overrides":
            config.study.overrides.update(value)
        else:
            config.study[name] = value
    return config


def test_plan_gives_each_seed_its_warm_ups_shared_by_the_methods(tmp_path):
    _, runs = study.plan(_study_config(tmp_path), repo=REPO)
    assert [(r.method, r.seed) for r in runs] == [("opd", 0), ("va_opd", 0), ("opd", 1), ("va_opd", 1)]
    teacher = [r.overrides["teacher.sft.output_dir"] for r in runs]
    assert teacher[0] == teacher[1] != teacher[2] == teacher[3]  # per seed, shared by the methods
    assert all(t.startswith(str(tmp_path / "warmups" / "teacher-")) for t in teacher)
    assert runs[0].overrides["student.sft.output_dir"] != teacher[0]
    shared = study.plan(_study_config(tmp_path, shared_warmups=True), repo=REPO)[1]
    assert len({r.overrides["teacher.sft.output_dir"] for r in shared}) == 1
    swept = study.plan(_study_config(tmp_path, sweep_field="data.synthetic_scaffold_tokens",
                                     sweep_values=(8, 16)), repo=REPO)[1]
    assert [(r.point, r.overrides["data.synthetic_scaffold_tokens"]) for r in swept[::4]] == [(8, 8), (16, 16)]
    # the replies change with the scaffold length, so the warm-ups do too
    assert swept[0].overrides["teacher.sft.output_dir"] != swept[4].overrides["teacher.sft.output_dir"]
    # a student whose vision tower is copied from the teacher changes with the teacher
    taught = study.plan(_study_config(tmp_path, overrides={"student.sft.vision_init": "teacher"}), repo=REPO)[1]
    other = study.plan(_study_config(tmp_path, overrides={"student.sft.vision_init": "teacher",
                                                          "teacher.sft.steps": 7}), repo=REPO)[1]
    assert taught[0].overrides["student.sft.output_dir"] != other[0].overrides["student.sft.output_dir"]
    # the resolved trainer config of a run is what the command line would give
    config = study.load_train_config(os.path.join(REPO, "configs", "demo.py"), "opd", swept[4].overrides)
    assert config.method == "opd" and config.data.synthetic_scaffold_tokens == 16 and config.train.num_steps == 20


def test_study_with_a_runner_reuses_runs_reports_eta_and_mechanism(tmp_path, capsys):
    calls = []
    results = study.run_study(_study_config(tmp_path), repo=REPO, runner=_fake_runner(calls))
    assert len(calls) == 4
    out = capsys.readouterr().out
    assert "study: run 1/4: opd seed 0" in out and "ETA after the first run" in out
    assert "study: run 2/4: va_opd seed 0" in out and "ETA 0 min" in out and "min/run" in out
    assert results["runs"]["va_opd"]["1"]["20"]["val/accuracy_fine"] == pytest.approx(0.3 + 0.21 * 2)
    assert results["mechanism"]["opd"]["0"]["train/loss_critical_share"] == {"1": 0.005, "10": 0.05, "20": 0.1}
    share = results["mechanism_summary"]["opd"]["train/loss_critical_share"]
    assert share["steps"] == [1, 10, 20] and share["run_mean"][0] == pytest.approx((0.005 + 0.05 + 0.1) / 3)
    assert results["steps_to_threshold"]["va_opd"]["per_seed"] == {"0": 20, "1": 20}
    assert results["coarse_lowest"]["opd"] == [1.0, 0.0]
    assert (tmp_path / "mechanism.png").is_file() and (tmp_path / "curves.png").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "steps to reach fine-detail accuracy 0.70" in table and "loss share on critical tokens" in table
    assert set(results["load_average"]) == {"before", "after"}
    # finished runs are reused; the same workdir with other settings is refused
    study.run_study(_study_config(tmp_path), repo=REPO, runner=_fake_runner(calls))
    assert len(calls) == 4
    with pytest.raises(ValueError, match="holds a run of other settings"):
        study.run_study(_study_config(tmp_path, num_steps=30), repo=REPO, runner=_fake_runner(calls))


def test_dilution_sweep_table_and_plot(tmp_path):
    calls = []
    config = _study_config(tmp_path, sweep_field="data.synthetic_scaffold_tokens", sweep_values=(0, 100))
    results = study.run_study(config, repo=REPO, runner=_fake_runner(calls))
    assert len(calls) == 8 and {c[2] for c in calls} == {0, 100}
    d = results["dilution"]
    assert d["points"] == [0, 100] and d["budget"] == 20
    # the fake VA-OPD gains 0.2 per 10 steps (x2 at 100), OPD 0.1: paired differences over seeds 0 and 1
    assert d["rows"]["0"]["va_opd_minus_opd"][0] == pytest.approx(0.2)
    assert d["rows"]["100"]["opd"]["final_fine"][0] == pytest.approx(0.3 + 0.2 * 2 + 0.01)
    assert d["rows"]["0"]["opd"]["reached"] == 0 and d["rows"]["0"]["opd"]["steps_to_threshold"] == [20.0, 0.0]
    assert d["rows"]["100"]["va_opd"]["per_seed_steps"] == {"0": 10, "1": 10}
    assert d["rows"]["0"]["opd"]["mechanism"]["train/loss_critical_share"][0] == pytest.approx(0.155 / 3)
    text = (tmp_path / "dilution.md").read_text()
    assert "| 100 | " in text and "VA-OPD − OPD" in text
    assert Image.open(tmp_path / "dilution.png").size == (1000, 400)
    assert (tmp_path / "synthetic_scaffold_tokens_100" / "va_opd" / "seed_1" / "metrics.jsonl").is_file()


def test_quick_study_end_to_end(tmp_path):
    workdir = tmp_path / "study"
    env = runtime_env()
    env.update({"JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true",  # the quick runs are all compilation
                "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "JAX_COMPILATION_CACHE_DIR": os.environ.get("VAOPD_TEST_JAX_CACHE") or str(tmp_path / "cache")})
    proc = subprocess.run(
        [sys.executable, "-m", "vaopd_jax.study", "--config", os.path.join(REPO, "configs", "study.py"), "--quick",
         f"--config.study.workdir={workdir}", "--config.study.methods=opd,va_opd", "--config.study.seeds=0",
         "--config.study.shared_warmups=true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0] and results["methods"] == ["opd", "va_opd"] and results["quick"]
    for method in ("opd", "va_opd"):
        steps = results["runs"][method]["0"]
        assert sorted(steps, key=int) == ["0", "2"]  # validation before training and at the last step
        assert 0.0 <= steps["2"]["val/accuracy_fine"] <= 1.0
        assert set(results["table"][method]["2"]) == {"fine", "coarse", "overall", "student VA"}
        # the student's VA at validation is a mechanism series of every run
        assert set(results["mechanism"][method]["0"]["val/student_va_mean"]) == {"0", "2"}
    assert results["target"] is not None and set(results["steps_to_target"]) == {"opd", "va_opd"}
    # one teacher and one student warm-up for both runs
    warmups = sorted(p.name.split("-")[0] for p in (workdir / "warmups").iterdir())
    assert warmups == ["student", "teacher"]
    assert all((p / "SFT_DONE").is_file() for p in (workdir / "warmups").iterdir())
    table = (workdir / "table.md").read_text()
    assert "| OPD |" in table and "| VA-OPD |" in table and "steps to reach OPD's final" in table
    assert Image.open(workdir / "curves.png").size == (600, 400)
    assert "study: run 1/2: opd seed 0" in proc.stdout  # reusing finished runs: the fake-runner test above
