"""vaopd_jax.notebook.utils: trainer command line, run comparison table, and the teacher VA of a student's answers
(checked against log-probs from full-vocabulary logits of the plain forward pass)."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vaopd_jax.notebook import utils as notebook_utils


def test_train_command_builds_the_trainer_argv():
    argv = notebook_utils.train_command("/repo/configs/demo.py", "/tmp/run", method="opd",
                                        overrides={"train.num_steps": 2, "train.async_checkpoint": False,
                                                   "data.prompt_buckets": [32, 64]})
    assert argv == [sys.executable, "-m", "vaopd_jax.train", "--config=/repo/configs/demo.py:method=opd",
                    "--config.workdir=/tmp/run", "--config.train.num_steps=2", "--config.train.async_checkpoint=false",
                    "--config.data.prompt_buckets=[32,64]"]
    assert notebook_utils.train_command("c.py", "w")[3] == "--config=c.py"  # no method: the file's default


def test_run_trainer_failure_names_the_bad_field(tmp_path):
    config = notebook_utils.find_config("demo.py")
    with pytest.raises(RuntimeError) as error:
        notebook_utils.run_trainer(config, str(tmp_path / "run"), overrides={"va.p_v": 1.5}, echo=False)
    message = str(error.value)
    assert "trainer exited with code" in message and "--config.va.p_v=1.5" in message
    assert "p_v" in message.split("--- last lines ---")[1]  # the trainer's own validation error is shown


def test_find_config_search_order(tmp_path, monkeypatch):
    nested = tmp_path / "checkout" / "notebooks" / "deeper"
    nested.mkdir(parents=True)
    (tmp_path / "checkout" / "configs").mkdir()
    (tmp_path / "checkout" / "configs" / "mine.py").write_text("# config\n")
    monkeypatch.delenv("VAOPD_CONFIGS", raising=False)
    expected = tmp_path / "checkout" / "configs" / "mine.py"
    assert notebook_utils.find_config("mine.py", search_from=nested) == str(expected)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "mine.py").write_text("# override\n")
    monkeypatch.setenv("VAOPD_CONFIGS", str(elsewhere))
    assert notebook_utils.find_config("mine.py", search_from=nested) == str(elsewhere / "mine.py")
    with pytest.raises(FileNotFoundError, match="configs/absent.py not found"):
        notebook_utils.find_config("absent.py", search_from=nested)


def _write_metrics(workdir, records):
    workdir.mkdir(parents=True)
    with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def test_comparison_rows_and_markdown(tmp_path):
    train = {"kind": "train", "train/loss": 1.0}
    _write_metrics(tmp_path / "opd", [
        {"step": 0, "kind": "val", "val/accuracy": 0.25, "val/accuracy_fine": 0.1, "val/accuracy_coarse": 0.4,
         "val/student_va_mean": 0.02},
        {"step": 1, **train},
        {"step": 60, "kind": "val", "val/accuracy": 0.5, "val/accuracy_fine": 0.3, "val/accuracy_coarse": 0.7,
         "val/student_va_mean": 0.05}])
    _write_metrics(tmp_path / "va", [
        {"step": 60, "kind": "val", "val/accuracy": 0.75, "val/student_va_mean": "nan"},  # file order != step order
        {"step": 0, "kind": "val", "val/accuracy": 0.25, "val/student_va_mean": 0.02}])
    rows = notebook_utils.comparison_rows({"OPD": str(tmp_path / "opd"), "VA-OPD": str(tmp_path / "va")})
    assert [(row["run"], row["when"], row["step"]) for row in rows] == [
        ("student at start", "before", 0), ("OPD", "after", 60), ("VA-OPD", "after", 60)]
    assert rows[1]["fine accuracy"] == 0.3 and rows[2]["accuracy"] == 0.75
    assert np.isnan(rows[2]["fine accuracy"]) and np.isnan(rows[2]["mean student VA"])
    lines = notebook_utils.comparison_markdown(rows).splitlines()
    assert lines[0] == "| run | step | fine accuracy | coarse accuracy | accuracy | mean student VA |"
    assert lines[3] == "| OPD | 60 | 0.300 | 0.700 | 0.500 | 0.050 |"
    assert lines[4] == "| VA-OPD | 60 | – | – | 0.750 | – |"


def test_validation_history_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        notebook_utils.validation_history(str(tmp_path / "never_ran"))
    _write_metrics(tmp_path / "no_val", [{"step": 1, "kind": "train", "train/loss": 1.0}])
    with pytest.raises(ValueError, match="eval.every > 0"):
        notebook_utils.validation_history(str(tmp_path / "no_val"))
    with pytest.raises(ValueError, match="runs is empty"):
        notebook_utils.comparison_rows({})


def test_make_records():
    images = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]
    records = notebook_utils.make_records(images, "<image>What is it?", answers=["a", "b"])
    assert [r["id"] for r in records] == ["image-0", "image-1"]
    assert [r["question"] for r in records] == ["<image>What is it?"] * 2 and records[1]["answer"] == "b"
    assert records[1]["images"][0].getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        notebook_utils.make_records(images, ["only one"])


def _tiny_model(seed):
    from vaopd_jax import config as config_lib
    from vaopd_jax.models import qwen3_vl

    # The real Qwen vocabulary and special ids (the records go through the real tokenizer).
    spec = config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vision_depth=1, vision_hidden=32,
                                head_dim=16)
    return qwen3_vl.Qwen3VL(config_lib.model_config_from_spec(spec), rngs=nnx.Rngs(seed))


def test_score_visual_advantage_matches_full_logits():
    from vaopd_jax.data import pipeline, synthetic
    from vaopd_jax.data import tokenizer as tokenizer_lib

    student, teacher = _tiny_model(0), _tiny_model(1)
    tokenizer = tokenizer_lib.load_tokenizer(None)
    source = synthetic.SyntheticSource(3, seed=5)
    records = [source[i] for i in range(3)]
    num_samples, max_new = 2, 6
    kwargs = dict(pixelation_ratio=0.1, min_pixels=1024, max_pixels=4096)
    # 3 records in batches of 2: the last batch is filled up and its extra rows dropped.
    scored = notebook_utils.score_visual_advantage(student, teacher, tokenizer, records, max_new_tokens=max_new,
                                                   num_samples=num_samples, temperature=1.0, batch_size=2, seed=3,
                                                   **kwargs)
    assert [r.record_id for r in scored] == [rec["id"] for rec in records for _ in range(num_samples)]
    lengths = [int(r.mask.sum()) for r in scored]
    assert all(1 <= n <= max_new for n in lengths)

    # Reference: each answer appended to its prompt, the plain forward pass's full (B, T, V) logits, the
    # log-prob of each answer token at the position before it, on both views.
    featurize = pipeline.Featurize(pipeline.PipelineConfig(batch_size=1, pixelation_ratio=0.1, min_pixels=1024,
                                                           max_pixels=4096), tokenizer=tokenizer)
    examples = [featurize(rec) for rec in records]
    rows = []
    for r in scored:
        example = examples[[rec["id"] for rec in records].index(r.record_id)]
        # The last answer token is only a target (never an input); this also keeps a sampled <|image_pad|>,
        # which ends the scored answer, out of the inputs.
        rows.append(np.concatenate([example["input_ids"], r.tokens[:int(r.mask.sum()) - 1]]))
    width = max(len(row) for row in rows)
    input_ids = np.zeros((len(rows), width), np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)] = row
        attention_mask[index, :len(row)] = 1
    grids = np.concatenate([examples[i // num_samples]["image_grid_thw"] for i in range(len(scored))])
    logp = {}
    for view in ("pixel_values", "pixel_values_pixelated"):
        pixels = np.concatenate([examples[i // num_samples][view] for i in range(len(scored))])
        logits = teacher(jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.asarray(pixels), jnp.asarray(grids))
        # LM-head rows beyond the tokenizer are padding: outside the normalisation (docs/method.md).
        logp[view] = np.asarray(jax.nn.log_softmax(logits[..., :len(tokenizer)], axis=-1))
    for index, r in enumerate(scored):
        start = len(examples[index // num_samples]["input_ids"]) - 1
        n = lengths[index]
        targets = r.tokens[:n]
        assert np.all(targets < len(tokenizer))  # padding rows are never sampled
        expected_orig = logp["pixel_values"][index, start + np.arange(n), targets]
        expected_pix = logp["pixel_values_pixelated"][index, start + np.arange(n), targets]
        np.testing.assert_allclose(r.logp_orig[:n], expected_orig, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(r.logp_pix[:n], expected_pix, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(r.va[:n], np.maximum(expected_orig - expected_pix, 0.0), atol=2e-4)
        assert np.all(r.va[n:] == 0) and np.all(r.logp_orig[n:] == 0)
        assert len(r.token_texts) == max_new
    # The pixelated view changes the teacher's log-probs (the two views really differ).
    assert max(float(np.abs(r.logp_orig - r.logp_pix).max()) for r in scored) > 0
