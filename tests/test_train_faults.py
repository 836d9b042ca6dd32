"""Bad data, full disks, unwritable logs and mismatched models in real `python -m vaopd_jax.train` runs (tiny
models, CPU, 4 steps; docs/reliability.md lists what each shows).

Two training runs over Geometry3K-format data, in file order (data.shuffle=False):
- "faulty": 24 records, 9 of them bad in every way the pipeline knows (undecodable, truncated, missing and
  decompression-bomb images, empty and missing answers, an over-long prompt, a corrupt parquet row group) and 3
  that need converting (CMYK, 16-bit, animated). It must finish, and report each fault by kind in its summary
  and in tensorboard.
- "clean": only the records the faulty run keeps, with its tensorboard directory unwritable and its disk full
  once checkpoint 2 is written. Its losses and checkpoint 2 must equal the faulty run's (the skipped records
  change nothing else); it must warn about the logs, train on, and stop at the failed step-4 save with
  checkpoint 2 intact and the latest.
Then three refused starts, each before any step: a resume with a changed config and a bigger student, a
teacher with another image-token id and tokenizer, a teacher checkpoint with an extra tensor.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from test_train import REPO, TINY, env_for, make_shared, run, train_args, train_losses

# Row -> fault (fixtures.FAULTS). All sit before the 8th kept record, so a 4-step run of 2 prompts reads them all.
FAULTS = {1: "undecodable", 2: "cmyk", 3: "truncated", 5: "missing_file", 6: "bomb", 7: "high_bit_depth",
          8: "empty_answer", 10: "corrupt_row_group", 12: "missing_answer", 13: "animated", 14: "long_prompt"}
NUM_ROWS = 24


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from vaopd_jax.data import fixtures

    shared = make_shared(tmp_path_factory.mktemp("faults"))
    root = shared["root"]
    shared["faulty"] = fixtures.write_geometry3k_with_faults(root / "faulty", FAULTS, num_rows=NUM_ROWS)
    shared["clean"] = fixtures.write_geometry3k_with_faults(root / "clean", FAULTS, num_rows=NUM_ROWS, clean=True)
    return shared


def data_args(shared, workdir, data, *extra):
    args = train_args(shared, workdir, "--config.data.source=geometry3k", f"--config.data.train_path={data}",
                      "--config.data.shuffle=False", "--config.eval.every=0", "--config.export.best=False", *extra)
    return args


def state_at(workdir, step):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return manager.all_steps(), manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
        "state"]


@pytest.fixture(scope="module")
def faulty_run(shared):
    workdir = str(shared["root"] / "faulty_run")
    proc = run(data_args(shared, workdir, shared["root"] / "faulty"), env_for(shared))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"workdir": workdir, "stdout": proc.stdout, "stderr": proc.stderr}


def test_bad_records_are_counted_by_kind_logged_and_the_run_finishes(shared, faulty_run):
    from vaopd_jax.data import pipeline
    from vaopd_jax.runtime import metrics as metrics_lib

    expected = shared["faulty"]["counts"]
    assert sum(n for k, n in expected.items() if k.startswith("data/skipped/")) == 9
    tb = metrics_lib.read_tensorboard_scalars(os.path.join(faulty_run["workdir"], "tb"))
    final = {tag: points[-1] for tag, points in tb.items() if tag.startswith("data/")}
    for reason in pipeline.SKIP_REASONS:
        assert final[f"data/skipped/{reason}"] == (4, expected.get(f"data/skipped/{reason}", 0)), reason
    for kind in pipeline.CONVERSIONS:
        assert final[f"data/converted/{kind}"] == (4, expected[f"data/converted/{kind}"]), kind
    assert final["data/skipped"] == (4, 9) and final["data/prompts"] == (4, 8) and final["data/batches"] == (4, 4)
    summary = [line for line in faulty_run["stdout"].splitlines() if line.startswith("data: skipped")]
    assert summary == ["data: skipped 9 record(s) (unreadable_row 2, missing_field 1, empty_answer 1, "
                       "missing_image_file 1, undecodable_image 2, image_too_large 1, prompt_too_long 1); "
                       "converted 3 image(s) (cmyk 1, high_bit_depth 1, animated 1); 8 prompts in 4 batches"]
    for record, reason in (("g3k-train-1", "undecodable_image"), ("g3k-train-5", "missing_image_file"),
                           ("g3k-train-6", "image_too_large"), ("g3k-train-8", "empty_answer"),
                           ("geometry3k-train-10", "unreadable_row"),  # its id column could not be read either
                           ("g3k-train-14", "prompt_too_long")):
        assert f"skipping record {record}: {reason}" in faulty_run["stderr"], record
    assert "step 4/4" in faulty_run["stdout"]
    assert os.path.exists(os.path.join(faulty_run["workdir"], "export", "final", "model.safetensors"))


def test_clean_run_equals_the_good_records_and_survives_unwritable_logs_and_a_full_disk(shared, faulty_run):
    workdir = shared["root"] / "clean_run"
    workdir.mkdir()
    (workdir / "tb").write_text("not a directory: tensorboard cannot write here")
    args = data_args(shared, str(workdir), shared["root"] / "clean")
    proc = run([sys.executable, os.path.join(REPO, "tests", "fault_train.py"), "2", *args[3:]], env_for(shared))
    assert proc.returncode != 0
    # The unwritable log directory: one warning, and training went on to the end.
    assert "cannot write the tensorboard log" in proc.stderr and "training goes on" in proc.stderr
    assert train_losses(str(workdir)) == train_losses(faulty_run["workdir"])  # the skipped records changed nothing
    # The full disk: the step-4 save failed, named; checkpoint 2 is complete, the latest, and equals the faulty run's.
    assert "checkpoint step 4 could not be written" in proc.stderr and "File too large" in proc.stderr
    assert f"the latest complete checkpoint is {workdir / 'checkpoints' / '2'}" in proc.stderr
    steps, state = state_at(str(workdir), 2)
    assert steps == [2]
    _, reference = state_at(faulty_run["workdir"], 2)
    import jax

    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(workdir / "export")


def test_a_resume_with_another_config_is_refused_before_any_step(shared, faulty_run):
    workdir = str(shared["root"] / "resume_changed")
    shutil.copytree(faulty_run["workdir"], workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    proc = run(data_args(shared, workdir, shared["root"] / "faulty", "--config.train.num_steps=6",
                         "--config.rollout.max_new_tokens=5", "--config.optim.lr=0.001",
                         f"--config.student.tiny.text.intermediate_size={2 * TINY['mlp']}"), env_for(shared))
    assert proc.returncode != 0
    assert "cannot resume from" in proc.stderr and os.path.join("checkpoints", "4") in proc.stderr
    assert "config.rollout.max_new_tokens: 4 in the checkpoint, 5 now" in proc.stderr
    assert "config.optim.lr: 0.0015 in the checkpoint, 0.001 now" in proc.stderr
    assert f"student.text.intermediate_size: {TINY['mlp']} in the checkpoint, {2 * TINY['mlp']} now" in proc.stderr
    assert ("--config.train.resume_across_changes=optim.lr,rollout.max_new_tokens,student.text.intermediate_size"
            in proc.stderr)
    assert "first step" not in proc.stdout and "step 5/6" not in proc.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def _teacher_copy(shared, name):
    path = shared["root"] / name
    shutil.copytree(shared["teacher"], path)
    return path


def test_a_teacher_with_other_image_token_ids_and_tokenizer_is_refused_before_compute(shared, tmp_path):
    from vaopd_jax.data.tokenizer import load_tokenizer

    teacher = _teacher_copy(shared, "teacher_other_ids")
    config = json.loads((teacher / "config.json").read_text())
    config["image_token_id"] = 151654
    (teacher / "config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(None)
    tokenizer.add_tokens(["<another_family_token>"])
    tokenizer.save_pretrained(teacher)
    proc = run(train_args(shared, str(tmp_path / "w"), f"--config.teacher.hf_path={teacher}"), env_for(shared),
               timeout=300)
    assert proc.returncode != 0
    assert "the teacher and the student cannot be distilled into each other" in proc.stderr
    assert "image_token_id: student 151655, teacher 151654" in proc.stderr
    assert "tokenizer: the run's has 151,669 tokens" in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_teacher_checkpoint_with_an_extra_tensor_is_refused_before_compute(shared, tmp_path):
    from vaopd_jax.models.qwen3_vl import convert

    teacher = _teacher_copy(shared, "teacher_extra_tensor")
    st = convert.SafetensorsFile(str(teacher / "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    tensors["model.visual.deepstack_merger_list.7.norm.weight"] = tensors["model.language_model.norm.weight"]
    convert._write_safetensors(str(teacher / "model.safetensors"), list(tensors.items()))
    proc = run(train_args(shared, str(tmp_path / "w"), f"--config.teacher.hf_path={teacher}"), env_for(shared),
               timeout=300)
    assert proc.returncode != 0
    assert "extra tensor 'model.visual.deepstack_merger_list.7.norm.weight' (1 extra" in proc.stderr
    assert "its tensors do not match its config.json" in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
