"""metrics.py: MFU arithmetic, tensorboard + JSONL writing, resume truncation, non-primary silence."""

import pytest
from vaopd_jax.runtime import metrics as metrics_lib


def test_flops_and_mfu_arithmetic():
    assert metrics_lib.rollout_flops(10, prompt_tokens=3, generated_tokens=7) == 200.0
    # student 6*N*T + teacher 2*N*T per view
    assert metrics_lib.update_flops(10, 100, sequence_tokens=5, teacher_views=2) == 6 * 10 * 5 + 2 * 100 * 5 * 2
    assert metrics_lib.mfu(989e12, 1.0, 2, 989.0) == pytest.approx(0.5)
    assert metrics_lib.mfu(1.0, 1.0, 1, None) is None
    assert metrics_lib.peak_tflops("TPU v5 lite") == 197.0
    assert metrics_lib.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert metrics_lib.peak_tflops("cpu") is None
    assert metrics_lib.peak_tflops("cpu", override=1.5) == 1.5


def test_logger_writes_tensorboard_jsonl_and_console(tmp_path, capsys):
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=4, console_every=2)
    for step in (1, 2, 3):
        scalars = logger.log_train(step, {"loss": 0.5 * step, "mean_va": 0.1}, rollout_s=3.0, update_s=1.0,
                                   tokens=400, flops=4e12, num_devices=2, peak_tflops_per_device=1.0,
                                   extra={"data/skipped": step - 1})
    logger.log_val(2, {"accuracy": 0.25})
    logger.close()
    assert scalars["perf/tokens_per_s"] == 100.0
    assert scalars["time/rollout_share"] == 0.75
    assert scalars["perf/mfu"] == pytest.approx(4e12 / (4.0 * 2 * 1e12))
    out = capsys.readouterr().out
    assert "step 2/4 | loss 1.0000 | 100 tok/s | rollout 3.00s update 1.00s | mfu 50.0% | ETA 0:00:08" in out
    assert "step 1/4" not in out and "validation @ step 2: accuracy 0.2500" in out
    tb = metrics_lib.read_tensorboard_scalars(str(tmp_path / "tb"))
    assert tb["train/loss"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert {"time/rollout_s", "time/update_s", "perf/tokens_per_s", "perf/mfu", "val/accuracy"} <= set(tb)
    assert tb["data/skipped"] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    records = metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (2, "val")]


def test_resume_discards_logs_after_the_restored_step(tmp_path):
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=4)
    for step in (1, 2, 3):
        logger.log_train(step, {"loss": float(step)}, rollout_s=1, update_s=1, tokens=1)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tra')  # a line cut by kill -9
    resumed = metrics_lib.MetricsLogger(str(tmp_path), total_steps=4, resume_step=2)
    for step in (3, 4):
        resumed.log_train(step, {"loss": 10.0 * step}, rollout_s=1, update_s=1, tokens=1)
    resumed.close()
    losses = [(r["step"], r["train/loss"]) for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl"))]
    assert losses == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    tb = metrics_lib.read_tensorboard_scalars(str(tmp_path / "tb"))
    assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_non_primary_writes_nothing(tmp_path, capsys):
    logger = metrics_lib.MetricsLogger(str(tmp_path / "w"), total_steps=2, is_primary=False)
    logger.log_train(1, {"loss": 1.0}, rollout_s=1, update_s=1, tokens=1)
    logger.log_val(1, {"accuracy": 1.0})
    logger.close()
    assert not (tmp_path / "w").exists() and capsys.readouterr().out == ""


def test_unwritable_log_sinks_are_turned_off_with_a_warning_and_logging_goes_on(tmp_path, capsys, caplog):
    (tmp_path / "tb").write_text("a file where the tensorboard directory should be")
    (tmp_path / "metrics.jsonl").mkdir()  # and a directory where the JSONL file should be
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=2)
    for step in (1, 2):
        logger.log_train(step, {"loss": float(step)}, rollout_s=1, update_s=1, tokens=1)
    logger.log_val(2, {"accuracy": 0.5})
    logger.close()
    assert set(logger.disabled) == {"tensorboard", "metrics.jsonl"}
    assert "cannot write the tensorboard log" in caplog.text and "cannot write the metrics.jsonl log" in caplog.text
    assert "training goes on" in caplog.text
    out = capsys.readouterr().out
    assert "step 2/2 | loss 2.0000" in out and "validation @ step 2" in out  # the console still has every step
