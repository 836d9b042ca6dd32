"""End-to-end evaluation: a tiny random Qwen3-VL on fixture benchmarks, resume, sharding, CLI."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vaopd_jax import config as config_lib
from vaopd_jax import evaluate
from vaopd_jax.eval.benchmarks import common, fixtures
from vaopd_jax.rollout import sampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import eval_default  # noqa: E402


def tiny_config():
    """Tiny Qwen3-VL whose vocabulary and special ids match the real Qwen tokenizer."""
    from vaopd_jax.models import qwen3_vl

    return qwen3_vl.Qwen3VLConfig.tiny(
        text=dict(vocab_size=151936), image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653)


@pytest.fixture(scope="module")
def tiny_model():
    from flax import nnx

    from vaopd_jax.models import qwen3_vl

    return qwen3_vl.Qwen3VL(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokenizer():
    from vaopd_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.load_tokenizer(None)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    fixtures.write_all(root, names=["wemath", "mathvista", "mmmu", "mmstar"])  # ai2d deliberately absent
    return root


def make_config(bench_root, out_dir, **overrides):
    c = eval_default.get_config()
    c.benchmarks_dir = str(bench_root)
    c.output_dir = str(out_dir)
    c.benchmarks = "wemath,mathvista,mmmu,mmstar,ai2d"
    c.num_samples = 2
    c.max_new_tokens = 8
    c.batch_size = 4
    c.min_prompt_bucket = 128  # every fixture prompt in one bucket: one compiled sampler program
    c.min_pixels, c.max_pixels = 1024, 4096
    c.dtype = "float32"
    c.mesh.data = 1  # one device: the 8 simulated test devices would only slow the compile down
    for key, value in overrides.items():
        c[key] = value
    return c


def count_lines(path):
    return sum(1 for line in open(path) if line.strip())


class CountingSampler:
    """Wraps sampler.Sampler.__call__ and counts the prompts sent to it."""

    def __init__(self, real):
        self.real, self.prompts = real, 0

    def __call__(self, rollouts, params, prompts, rng=None):
        self.prompts += prompts.num_prompts
        return self.real(rollouts, params, prompts, rng)

    def install(self, monkeypatch):
        counter = self
        monkeypatch.setattr(sampler.Sampler, "__call__", lambda rollouts, *a, **k: counter(rollouts, *a, **k))
        return self


def test_tiny_model_end_to_end_then_resume(tiny_model, tokenizer, bench_root, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    config = make_config(bench_root, out)
    counter = CountingSampler(sampler.Sampler.__call__).install(monkeypatch)
    summary = evaluate.evaluate(config, model=tiny_model, tokenizer=tokenizer, model_name="tiny-random")

    # Per-sample JSONL: one line per usable question, K samples each.
    samples = out / "samples"
    assert count_lines(samples / "wemath.p0.jsonl") == 7
    assert count_lines(samples / "mathvista.p0.jsonl") == 3  # the 4th has a missing image file
    assert count_lines(samples / "mmmu.p0.jsonl") == 3
    assert count_lines(samples / "mmstar.p0.jsonl") == 2  # the 3rd has a corrupt image
    row = json.loads(open(samples / "mmmu.p0.jsonl").readline())
    assert set(row) >= {"id", "prompt_id", "samples", "answers", "correct", "gold", "response_tokens", "truncated"}
    assert len(row["samples"]) == len(row["answers"]) == len(row["correct"]) == 2
    assert all(isinstance(s, str) for s in row["samples"])

    # Summary: scores for present benchmarks, 'missing' (not zero) for ai2d, problems counted and named.
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["benchmarks"].keys() == summary["benchmarks"].keys()
    b = summary["benchmarks"]
    assert b["ai2d"]["status"] == "missing" and b["ai2d"]["score"] is None
    for name in ("wemath", "mathvista", "mmmu", "mmstar"):
        assert b[name]["status"] == "ok" and 0.0 <= b[name]["score"] <= 100.0
    assert b["mathvista"]["skipped"] == 1 and "404.png does not exist" in b["mathvista"]["problems"][0]["reason"]
    assert b["mmstar"]["skipped"] == 1 and "cannot be decoded" in b["mmstar"]["problems"][0]["reason"]
    assert b["mmstar"]["extraction"].startswith("rule-based fallback")
    assert summary["visual_avg"] is None and summary["math_avg"] is None  # ai2d missing, mathverse not run
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| model | WeMath | MathVista | MathVerse | Math avg |")
    assert "| tiny-random |" in table and "| missing |" in table and "not run" in table
    assert "AI2D: missing" in table and "1 of 3 questions skipped" in table
    generated = counter.prompts
    assert generated >= 15

    # Second run: nothing regenerated, same scores.
    counter.prompts = 0
    again = evaluate.evaluate(config, model=tiny_model, tokenizer=tokenizer, model_name="tiny-random")
    assert counter.prompts == 0
    assert again["benchmarks"]["wemath"]["score"] == summary["benchmarks"]["wemath"]["score"]

    # A run killed mid-write leaves a partial last line: only that question is generated again.
    path = samples / "mmmu.p0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    evaluate.evaluate(config, model=tiny_model, tokenizer=tokenizer, model_name="tiny-random")
    assert counter.prompts == config.batch_size  # one call (one question, batch filled to batch_size)
    assert len(evaluate.read_rows([path])) == 3

    # Samples drawn with other settings are never mixed into this directory.
    with pytest.raises(evaluate.EvalConfigError, match="num_samples"):
        evaluate.evaluate(make_config(bench_root, out, num_samples=3), model=tiny_model, tokenizer=tokenizer,
                          model_name="tiny-random")


class FixedTextSampler:
    """A stand-in for sampler.Sampler.__call__ whose every sample is the same text: scores become known numbers."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [151645]

    def install(self, monkeypatch):
        fixed = self
        monkeypatch.setattr(sampler.Sampler, "__call__", lambda rollouts, params, prompts, rng=None: fixed(
            prompts.num_prompts * rollouts.num_samples, rollouts.max_new_tokens))

    def __call__(self, rows, max_new_tokens):
        tokens = np.full((rows, max_new_tokens), 151643, np.int32)
        n = min(len(self.ids), max_new_tokens)
        tokens[:, :n] = self.ids[:n]
        mask = np.zeros_like(tokens)
        mask[:, :n] = 1
        return sampler.SamplerOutput(tokens, mask, mask.sum(-1), np.zeros(tokens.shape, np.float32),
                                     np.zeros(tokens.shape, np.float32), np.ones(rows, bool))


def test_scores_through_the_whole_pipeline(tiny_model, tokenizer, bench_root, tmp_path, monkeypatch):
    FixedTextSampler(tokenizer, "The answer is \\boxed{B}.").install(monkeypatch)
    config = make_config(bench_root, tmp_path / "eval", benchmarks="wemath,mathvista,mmstar",
                         max_new_tokens=32)
    summary = evaluate.evaluate(config, model=tiny_model, tokenizer=tokenizer, model_name="fixed")
    b = summary["benchmarks"]
    assert b["wemath"]["score"] == pytest.approx(100.0)  # every WeMath fixture answer is B: mastery
    assert b["wemath"]["strict"] == pytest.approx(100.0)
    assert b["mathvista"]["accuracy"] == pytest.approx(1 / 3)  # only the MC question (B = 45°)
    assert b["mmstar"]["score"] == pytest.approx(0.0)  # golds D and A
    rows = evaluate.read_rows(evaluate.samples_files(Path(config.output_dir), "wemath"))
    assert rows["7:2steps_1"]["answers"] == ["B", "B"] and rows["7:2steps_1"]["correct"] == [True, True]
    # results.md says how each benchmark was scored
    assert summary["settings"]["scoring"] == "official" and b["mathvista"]["scoring"] == "official"
    results = (Path(config.output_dir) / "results.md").read_text()
    assert "- MathVista: official scoring, an unparsed multiple-choice answer is mapped to the most similar" in results
    assert "- WeMath: 2 complete groups of the official 525 (0 incomplete)" in results
    assert "- MMStar: score = mean over all questions (VLMEvalKit); over all questions 0.0, over l2 categories" in results
    # A later run over fewer questions (config.limit) summarizes only those questions.
    limited = make_config(bench_root, tmp_path / "eval", benchmarks="wemath,mathvista,mmstar",
                          max_new_tokens=32, limit=2)
    summary = evaluate.evaluate(limited, model=tiny_model, tokenizer=tokenizer, model_name="fixed")
    assert summary["benchmarks"]["mathvista"]["scored"] == 2
    assert summary["benchmarks"]["mathvista"]["accuracy"] == pytest.approx(0.5)


def test_process_slices_are_merged(tokenizer, tiny_model, bench_root, tmp_path, monkeypatch):
    FixedTextSampler(tokenizer, "Answer: D").install(monkeypatch)
    config = config_lib.load_evaluate(make_config(bench_root, tmp_path / "eval", benchmarks="mmstar"))
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    from vaopd_jax.eval import benchmarks

    bench = benchmarks.get("mmstar")
    for index in (0, 1):  # what two processes do, each with its own slice and file
        runtime = evaluate.Runtime(config, model=tiny_model, tokenizer=tokenizer)
        evaluate.evaluate_benchmark(bench, config, runtime, out, process_index=index, process_count=2)
    first = evaluate.read_rows([out / "samples" / "mmstar.p0.jsonl"])
    second = evaluate.read_rows([out / "samples" / "mmstar.p1.jsonl"])
    assert set(first) == {"0"} and set(second) == {"1"}  # record 2 (corrupt) fell in slice 0 and was skipped
    merged = evaluate.summarize_benchmark(bench, out, config.num_samples, judge=None)
    assert merged["scored"] == 2 and merged["skipped"] == 1
    assert merged["score"] == pytest.approx(50.0)  # D is right for record 0 only


DRIVER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
import test_eval_e2e as t
from vaopd_jax import config as config_lib
from vaopd_jax import evaluate
config = t.make_config(sys.argv[4], sys.argv[5], benchmarks="wemath,ai2d")
summary = evaluate.evaluate(config, model_name="fixed")
print("PROCESS", jax.process_index(), "SUMMARY", bool(summary))
"""


def test_two_processes_barrier_then_process_0_merges(bench_root, tmp_path):
    """Two real JAX processes (jax.distributed, gloo): each handles its slice, process 0 alone
    merges every process's file. The slices are already scored here (as after an interrupted
    run), so nothing is loaded or generated; generation per slice is covered above."""
    import socket

    out = tmp_path / "eval"
    config = make_config(bench_root, out, benchmarks="wemath,ai2d")
    evaluate.check_run_settings(out, config, "fixed")
    records = __import__("vaopd_jax.eval.benchmarks", fromlist=["get"]).get("wemath").read(bench_root / "wemath").records
    (out / "samples").mkdir()
    for index in (0, 1):
        with open(out / "samples" / f"wemath.p{index}.jsonl", "w") as f:
            for record in records[index::2]:  # every answer right except on the 3-step group's multi question
                correct = record.id != "7:3steps_multi"
                f.write(json.dumps({"id": record.id, "meta": record.meta, "correct": [correct, correct],
                                    "answers": ["B", "B"], "response_tokens": [3, 3],
                                    "truncated": [False, False]}) + "\n")
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, str(driver), f"localhost:{port}", str(i), str(REPO / "tests"),
                               str(bench_root), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    assert "PROCESS 0 SUMMARY True" in outputs[0][0] and "PROCESS 1 SUMMARY False" in outputs[1][0]
    summary = json.loads((out / "summary.json").read_text())
    wemath = summary["benchmarks"]["wemath"]
    assert wemath["scored"] == 7  # rows from both processes' files
    # 2-step group: complete mastery; 3-step group (same ID): all subs right, multi wrong -> IG: (2 - 0.5) / 2 = 75.
    assert wemath["score"] == pytest.approx(75.0)
    assert summary["benchmarks"]["ai2d"]["status"] == "missing"


def test_prompt_longer_than_the_model_allows_is_skipped(tokenizer, bench_root, tmp_path):
    from vaopd_jax.eval import benchmarks

    mmstar = benchmarks.get("mmstar")
    record = mmstar.read(bench_root / "mmstar").records[0]
    config = make_config(bench_root, tmp_path, max_new_tokens=4090)
    prompt = evaluate.build_prompt(mmstar, record, tokenizer, config)
    assert prompt.pixel_values.shape == (8, 1536) and prompt.grid_thw.tolist() == [[1, 2, 4]]
    with pytest.raises(common.BadRecord, match="exceeds the model's 4096 positions"):
        evaluate.build_prompt(mmstar, record, tokenizer, config, max_positions=4096)
    config.max_prompt_tokens = len(prompt.input_ids) - 1
    with pytest.raises(common.BadRecord, match="> max_prompt_tokens"):
        evaluate.build_prompt(mmstar, record, tokenizer, config)


def test_prompt_images_follow_the_releases_path(tokenizer, bench_root, tmp_path):
    """Default image_path 'release': Pillow bounds resize + RGB (alpha dropped) before the processor; the
    'single_resize' option is the processor alone (alpha composited onto white)."""
    from tests.release_reference import mode_image, release_views
    from vaopd_jax.data import processor
    from vaopd_jax.data.fixtures import encode_image
    from vaopd_jax.eval import benchmarks

    mmstar = benchmarks.get("mmstar")
    image = mode_image(25, 37, "RGBA", seed=5)  # below min_pixels=1024: the release resizes it first
    record = mmstar.read(bench_root / "mmstar").records[0]
    record = dataclasses.replace(record, images=[common.ImageRef(data=encode_image(image))])
    config = make_config(bench_root, tmp_path)
    assert config.image_path == "release"
    prompt = evaluate.build_prompt(mmstar, record, tokenizer, config)
    expected, grid = processor.preprocess_image(release_views(image, 0.1, 1024, 4096)[0], 1024, 4096)
    np.testing.assert_array_equal(prompt.pixel_values, expected)
    np.testing.assert_array_equal(prompt.grid_thw, [grid])
    config.image_path = "single_resize"
    single = evaluate.build_prompt(mmstar, record, tokenizer, config)
    np.testing.assert_array_equal(single.pixel_values, processor.preprocess_image(image, 1024, 4096)[0])
    assert not np.array_equal(single.pixel_values, prompt.pixel_values)
    config.image_path = "twice"
    with pytest.raises(evaluate.EvalConfigError, match="image_path"):
        config_lib.load_evaluate(config)
    config.image_path, config.scoring, config.mmstar_average = "release", "lenient", "rows"
    with pytest.raises(evaluate.EvalConfigError, match="config.scoring = 'lenient'"):
        config_lib.load_evaluate(config)


def test_invalid_config_names_fields(bench_root, tmp_path):
    config = make_config(bench_root, tmp_path, benchmarks="wemath,mmbench", top_p=1.5, num_samples=0)
    with pytest.raises(evaluate.EvalConfigError) as err:
        config_lib.load_evaluate(config)
    message = str(err.value)
    assert "config.benchmarks = 'wemath,mmbench'" in message
    assert "config.top_p = 1.5: must be in (0, 1]" in message
    assert "config.num_samples = 0" in message


def test_hf_checkpoint_directory_is_loaded(tiny_model, tokenizer, bench_root, tmp_path, monkeypatch):
    from vaopd_jax.models import qwen3_vl

    save = getattr(qwen3_vl, "save_hf_checkpoint", None)
    if save is None:
        from vaopd_jax.models.qwen3_vl.convert import save_hf_checkpoint as save
    workdir = tmp_path / "run"
    save(tiny_model, str(workdir / "export" / "best"))  # a training workdir's exported best student
    FixedTextSampler(tokenizer, "Answer: D").install(monkeypatch)
    config = make_config(bench_root, tmp_path / "eval", benchmarks="mmstar", model=str(workdir))
    assert evaluate.resolve_model_dir(config) == workdir / "export" / "best"
    runtime = evaluate.Runtime(config)
    loaded = runtime()["model"]
    np.testing.assert_array_equal(np.asarray(loaded.lm_head_kernel()), np.asarray(tiny_model.lm_head_kernel()))
    summary = evaluate.evaluate(config)
    assert summary["model"] == str(workdir)
    assert summary["benchmarks"]["mmstar"]["score"] == pytest.approx(50.0)
    with pytest.raises(evaluate.EvalConfigError, match="export/final/config.json"):
        evaluate.resolve_model_dir(make_config(bench_root, tmp_path, model=str(workdir), export="final"))


def test_cli_reports_missing_benchmarks_and_bad_fields(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = tmp_path / "cli_eval"
    cmd = [sys.executable, "-m", "vaopd_jax.evaluate", "--config", str(REPO / "configs" / "eval_default.py"),
           f"--config.model={tmp_path / 'no_model_needed'}", f"--config.benchmarks_dir={tmp_path / 'empty'}",
           f"--config.output_dir={out}", "--config.benchmarks=wemath,ocrbench"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | WeMath |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {n: b["status"] for n, b in summary["benchmarks"].items()} == {"wemath": "missing", "ocrbench": "missing"}
    assert summary["math_avg"] is None
    # The start-up line names the backend; the bf16 default config on a CPU-only JAX is warned about.
    assert "devices: 1 x cpu in 1 process(es) (backend cpu" in proc.stderr
    assert "meant for GPUs/TPUs (bfloat16 weights and matmuls)" in proc.stderr
    # A bad field fails before any compute, naming it and the allowed range.
    bad = subprocess.run(cmd + ["--config.top_p=0"], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path), env=env)
    assert bad.returncode != 0 and "config.top_p = 0.0: must be in (0, 1]" in bad.stderr
