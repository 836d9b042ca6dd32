"""vaopd_jax.runtime.phases (wall time and peak RSS per phase) and the report of `python -m vaopd_jax.bench.demo`."""

import json
import sys
import time

import numpy as np
import pytest

from vaopd_jax.runtime import phases
from vaopd_jax.bench import demo as bench_demo

MB = 1024 ** 2


def hold(megabytes: int, seconds: float = 0.0) -> None:
    block = np.ones(megabytes * MB, np.uint8)  # written, so resident
    time.sleep(seconds)
    del block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS samples come from /proc/self/status")
def test_each_phase_reports_its_own_peak_and_outer_phases_include_inner_ones():
    meter = phases.PhaseMeter(interval_s=0.005)
    assert meter.sampled
    with meter.phase("big"):
        hold(300)  # raises the process's peak: reported exactly, however short
    with meter.phase("small"):
        hold(10)
    with meter.phase("outer"):
        with meter.phase("inner"):
            hold(200, seconds=0.3)  # below the process's peak: seen by the sampling thread
        hold(10)
    meter.close()
    big, small = meter.records["big"].peak_rss, meter.records["small"].peak_rss
    # The 300 MB of "big" were freed before "small" began: small's peak is its own.
    assert big - small > 250 * MB, (big / MB, small / MB)
    assert meter.records["outer"].peak_rss >= meter.records["inner"].peak_rss > small + 150 * MB


def test_a_phase_entered_again_adds_its_time_and_counts_calls():
    meter = phases.PhaseMeter()
    for _ in range(3):
        with meter.phase("step"):
            pass
    with meter.phase("export"):
        pass
    report = meter.as_dict()
    meter.close()
    assert [(r["name"], r["calls"]) for r in report["phases"]] == [("step", 3), ("export", 1)]
    assert report["wall_s"] >= sum(r["wall_s"] for r in report["phases"]) >= 0
    assert report["peak_rss"] >= max(r["peak_rss"] for r in report["phases"]) > 0
    table = meter.table()
    assert table.splitlines()[1].split()[:2] == ["step", "3"] and "whole process" in table


def test_phases_misuse_is_an_error():
    meter = phases.PhaseMeter()
    with pytest.raises(ValueError, match="not open"):
        meter.end("validation")
    with meter.phase("distillation"):
        with pytest.raises(ValueError, match="already open"):
            meter.begin("distillation")


def test_bench_demo_reports_a_runs_phases_and_the_process(tmp_path, capsys):
    meter = phases.PhaseMeter()
    with meter.phase("teacher SFT"):
        pass
    path = tmp_path / "phases.json"
    meter.write_json(str(path))
    assert json.loads(path.read_text())["phases"][0]["name"] == "teacher SFT"
    assert bench_demo.main(["--report", str(path)]) == 0
    assert "teacher SFT" in capsys.readouterr().out

    text = bench_demo.report("fresh run", bench_demo.read_phases(str(path)),
                             {"returncode": 0, "wall_s": 150.0, "peak_rss": 3 * phases.GB // 2},
                             ((4.0, 3.0, 2.0), (5.0, 3.5, 2.5)))
    assert "wall 150.0 s (2.5 min), peak RSS 1.50 GB, exit code 0" in text
    assert "before: 4.00, 3.00, 2.00; after: 5.00, 3.50, 2.50" in text

    cached = bench_demo.demo_command("/w/cached", "/w/cache", ["--config.train.num_steps=2"], sft_from="/w/fresh")
    assert "--config.teacher.sft.output_dir=/w/fresh/teacher_sft" in cached
    assert "--config.student.sft.output_dir=/w/fresh/student_sft" in cached
    assert cached[-1] == "--config.train.num_steps=2" and "--config.workdir=/w/cached" in cached

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="phases.json"):
        bench_demo.read_phases(str(tmp_path / "bad.json"))
