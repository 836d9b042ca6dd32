"""Evaluate a student on the paper's eight benchmarks (avg@k, offline).

    python -m vaopd_jax.evaluate --config configs/eval_default.py \\
        --config.model=/path/to/hf_student --config.benchmarks_dir=/data/benchmarks

For every benchmark directory found under ``benchmarks_dir`` (``wemath``, ``mathvista``,
``mathverse``, ``hallusionbench``, ``ai2d``, ``mmmu``, ``mmstar``, ``ocrbench``; each a
local copy of the public Hugging Face release), each question is prompted with the
model's own chat template, num_samples samples are drawn with the project's sampler
(temperature 1.0, top-p 1.0, 8 by default), the first committed answer of each
sample is extracted and graded, and the benchmark's official metric is computed per
sample run and averaged over the num_samples runs (avg@k).

Outputs in ``output_dir``:
  samples/<benchmark>.p<process>.jsonl   one line per question: id, prompt id, gold,
                                         the responses, extracted answers, correctness
  samples/<benchmark>.p<process>.problems.json   records that could not be used
  summary.json                           scores, details, counts, protocol notes
  results.md                             the paper's table with Math avg and Visual avg
Runs resume: questions already in a samples file are not generated again (a run
killed mid-way loses at most the batch in flight). A benchmark missing on disk is
reported as missing, never as zero; a corrupt image / missing image file / overlong
prompt is counted, listed in the summary and left out of the score.

Multi-process: every process evaluates its slice of each benchmark (records
``process_index::process_count``) with the model on its LOCAL devices, writes its
own samples file, and process 0 merges all files into the summary (the output
directory must be shared).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vaopd_jax import config as config_lib
from vaopd_jax.data import processor
from vaopd_jax.eval import benchmarks as benchmarks_lib
from vaopd_jax.eval import grading
from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.judge import make_judge

log = logging.getLogger("vaopd_jax.evaluate")

RUN_KEYS = ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "prompt_suffix",
            "min_pixels", "max_pixels", "image_path", "scoring")


# A bad field, mixed settings in one output directory, or an unknown model directory (one error type with the
# trainer's config; `config.load_evaluate` validates every field once, at the entry point).
EvalConfigError = config_lib.ConfigError


def benchmark_dir(config, name: str) -> Path:
    return Path(config.benchmark_dir(name))


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class Prompt:
    record: common.Record
    input_ids: np.ndarray  # (T,) int32
    pixel_values: Optional[np.ndarray]  # (N, 1536) float32 or None
    grid_thw: np.ndarray  # (n_images, 3) int64


def prompt_id(name: str, record_id: str) -> str:
    """Stable short id of one question (benchmark + record id)."""
    return hashlib.sha1(f"{name}/{record_id}".encode()).hexdigest()[:16]


def build_prompt(bench, record, tokenizer, config, max_positions: Optional[int] = None) -> Prompt:
    """Decode images, preprocess them and tokenize the chat prompt; raises BadRecord.

    max_positions: the model's position limit; a prompt that leaves no room for
    config.max_new_tokens is skipped (reported), not sent to the sampler."""
    images = [ref.load() for ref in record.images]
    try:
        images = [processor.model_image(image, config.min_pixels, config.max_pixels, config.image_path)
                  for image in images]
        pixel_values, grids = processor.preprocess_images(images, config.min_pixels, config.max_pixels)
        ids, _ = processor.build_prompt(tokenizer, bench.prompt_text(record, config.prompt_suffix), grids)
    except (ValueError, OSError) as err:
        raise common.BadRecord(f"prompt for {record.id} cannot be built: {err}") from err
    if len(ids) > config.max_prompt_tokens:
        raise common.BadRecord(f"prompt of {record.id} has {len(ids)} tokens > max_prompt_tokens="
                               f"{config.max_prompt_tokens}")
    if max_positions is not None and len(ids) + config.max_new_tokens > max_positions:
        raise common.BadRecord(f"prompt of {record.id} has {len(ids)} tokens; with max_new_tokens="
                               f"{config.max_new_tokens} it exceeds the model's {max_positions} positions")
    return Prompt(record, np.asarray(ids, np.int32), pixel_values if len(images) else None, grids)


def prompt_batch(prompts: Sequence[Prompt], batch_size: int, model_config, *, pad_id: int, min_prompt_bucket: int):
    """The `data.batch.PromptBatch` of one sampler call: the prompts, then copies of the first one up to
    batch_size rows (their outputs are dropped), padded to a power-of-two prompt bucket: one compiled sampler
    program per (prompt, patch) bucket, not per batch."""
    from vaopd_jax.data import batch as batch_lib
    from vaopd_jax.rollout import sampler

    filled = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
    examples = [{"input_ids": p.input_ids, "image_grid_thw": p.grid_thw, "pixel_values": p.pixel_values,
                 "id": p.record.id} for p in filled]
    longest = max(len(p.input_ids) for p in filled)
    return batch_lib.from_examples(examples, model_config, pad_id=pad_id,
                                   prompt_len=sampler.bucket_size(longest, min_prompt_bucket))


# ----------------------------------------------------------------------------- results files


def samples_files(out_dir: Path, name: str) -> list[Path]:
    return sorted((out_dir / "samples").glob(f"{name}.p*.jsonl"))


def read_rows(paths: Sequence[Path]) -> dict:
    """{record id: row} from samples files; unparsable lines (a run killed mid-write) are skipped."""
    rows = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s line %d is incomplete (interrupted write); that question is regenerated",
                                path, number)
                    continue
                rows[row["id"]] = row
    return rows


def check_run_settings(out_dir: Path, config, model_name: str) -> None:
    """Refuse to mix samples drawn with different settings in one output directory."""
    settings = {k: getattr(config, k) for k in RUN_KEYS}
    settings["model"] = model_name
    path = out_dir / "run_settings.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            raise EvalConfigError(
                f"{out_dir} holds samples drawn with different settings {changed} (old, new); use another "
                "config.output_dir or delete it to start over")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


# ----------------------------------------------------------------------------- generation


def _decode(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> str:
    return tokenizer.decode([int(t) for t, m in zip(tokens, mask) if m], skip_special_tokens=True)


def generate_rows(bench, prompts: Sequence[Prompt], rt: dict, config, *, rng, judge) -> list[dict]:
    """config.num_samples samples of each prompt through the runtime's `rollout.Sampler`, extracted and graded
    -> JSONL rows. rt: the `Runtime`'s tokenizer, model, sampler and params."""
    batch = prompt_batch(prompts, config.batch_size, rt["model"].config, pad_id=rt["eos_ids"][-1],
                         min_prompt_bucket=config.min_prompt_bucket)
    out = rt["sampler"](rt["params"], batch, rng)
    tokens = np.asarray(out.tokens)
    response_mask = np.asarray(out.response_mask)
    finished = np.asarray(out.finished)
    k = config.num_samples
    texts = [[_decode(rt["tokenizer"], tokens[i * k + j], response_mask[i * k + j]) for j in range(k)]
             for i in range(len(prompts))]
    graded = bench.score([p.record for p in prompts], texts, judge=judge, timeout_s=config.grading_timeout_s,
                         scoring=scoring_of(config))
    rows = []
    for i, p in enumerate(prompts):
        rows.append({
            "id": p.record.id,
            "prompt_id": prompt_id(bench.name, p.record.id),
            "benchmark": bench.name,
            "gold": p.record.answer,
            "meta": p.record.meta,
            "prompt_tokens": int(len(p.input_ids)),
            "samples": texts[i],
            "answers": [g[0] for g in graded[i]],
            "correct": [bool(g[1]) for g in graded[i]],
            "extractor": [g[2] for g in graded[i]],
            "response_tokens": [int(response_mask[i * k + j].sum()) for j in range(k)],
            "truncated": [not bool(finished[i * k + j]) for j in range(k)],
        })
    return rows


def evaluate_benchmark(bench, config, runtime, out_dir: Path, *, process_index: int, process_count: int,
                       judge=None) -> dict:
    """Generate and grade this process's slice of one benchmark; returns counters for the log.

    runtime: a `Runtime` (tokenizer, model, sampler, params), called only when this slice has questions left to
    generate.
    """
    import jax

    root = benchmark_dir(config, bench.name)
    result = bench.read(root, limit=config.limit or None)  # MissingBenchmark / ValueError propagate
    done = set(read_rows(samples_files(out_dir, bench.name)))
    mine = result.records[process_index::process_count]
    todo = [r for r in mine if r.id not in done]
    problems = list(result.problems) if process_index == 0 else []
    samples_path = out_dir / "samples" / f"{bench.name}.p{process_index}.jsonl"
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: %d questions (%d this process, %d already scored, %d to generate)", bench.name,
             len(result.records), len(mine), len(mine) - len(todo), len(todo))
    start, generated = time.time(), 0
    base_key = jax.random.key(config.seed)
    pending: list[Prompt] = []
    rt = runtime() if todo else {}

    def flush():
        nonlocal generated
        if not pending:
            return
        seed = int(hashlib.sha1("|".join(p.record.id for p in pending).encode()).hexdigest()[:8], 16)
        rows = generate_rows(bench, pending, rt, config, rng=jax.random.fold_in(base_key, seed), judge=judge)
        with open(samples_path, "a+", encoding="utf-8") as f:
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":  # a partial line from a killed run: keep it on its own line
                    f.write("\n")
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        generated += len(rows)
        elapsed = time.time() - start
        rate = generated / max(elapsed, 1e-9)
        log.info("%s: %d/%d generated (%.2f questions/s, ETA %.0fs)", bench.name, generated, len(todo), rate,
                 (len(todo) - generated) / max(rate, 1e-9))
        pending.clear()

    for record in todo:
        try:
            pending.append(build_prompt(bench, record, rt["tokenizer"], config, rt["max_positions"]))
        except common.BadRecord as err:
            log.warning("%s: skipping %s: %s", bench.name, record.id, err)
            problems.append({"id": record.id, "reason": str(err)})
            continue
        if len(pending) == config.batch_size:
            flush()
    flush()
    # Records of this slice that were skipped in this run (recomputed on every run: cheap, and a
    # fixed file is picked up next time).
    problems_path = out_dir / "samples" / f"{bench.name}.p{process_index}.problems.json"
    problems_path.write_text(json.dumps({"problems": problems, "files": result.files,
                                         "records": len(result.records)}, indent=1))
    return {"generated": generated, "skipped": len(problems), "ids": [r.id for r in result.records]}


# ----------------------------------------------------------------------------- summary


def scoring_of(config) -> benchmarks_lib.Scoring:
    return benchmarks_lib.Scoring(config.scoring, config.mmstar_average).check()


LENIENCY_LABELS = ("nearest_option", "random_option", "uncertain_counts_as_correct")


def summarize_benchmark(bench, out_dir: Path, num_samples: int, judge, ids: Optional[Sequence[str]] = None,
                        scoring: benchmarks_lib.Scoring = benchmarks_lib.Scoring()) -> dict:
    """Merge every process's samples and problems files into the benchmark's summary.

    ids: the benchmark's current question ids (rows of questions outside them, e.g. from a
    run with a larger config.limit, are left out); None keeps every row.
    scoring: how the samples were scored (recorded) and how the score is averaged (MMStar).
    """
    rows_by_id = read_rows(samples_files(out_dir, bench.name))
    if ids is not None:
        wanted = set(ids)
        rows_by_id = {k: v for k, v in rows_by_id.items() if k in wanted}
    rows = list(rows_by_id.values())
    problems_by_id, files, records = {}, [], 0
    for path in sorted((out_dir / "samples").glob(f"{bench.name}.p*.problems.json")):
        info = json.loads(path.read_text())
        for problem in info["problems"]:  # files of an earlier run with more processes may repeat ids
            if problem["id"] not in rows_by_id:
                problems_by_id[problem["id"]] = problem
        files = files or info["files"]
        records = max(records, info["records"])
    problems = list(problems_by_id.values())
    judged = sum(e == "judge" for r in rows for e in r.get("extractor", []))
    if bench.official_uses_judge and judge is None:
        extraction = "rule-based fallback (the official protocol uses an LLM judge; none configured)"
    elif bench.official_uses_judge:
        extraction = f"rules, then {judge.describe()} where the rules found no answer ({judged} samples)"
    else:
        extraction = "rule-based (as the official protocol)"
    summary = {
        "status": "ok" if rows else "empty",
        "display": bench.display,
        "group": bench.group,
        "protocol": bench.protocol,
        "extraction": extraction,
        "records": records,
        "scored": len(rows),
        "skipped": len(problems),
        "problems": problems[:50],
        "files": files,
        "num_samples": num_samples,
        "scoring": scoring.mode,
        "leniency": (bench.leniency if scoring.mode == "official" else "") or None,
        "leniency_samples": {label: sum(e == label for r in rows for e in r.get("extractor", []))
                             for label in LENIENCY_LABELS},
    }
    if rows:
        summary.update(bench.aggregate(rows, num_samples, scoring))
        tokens = [t for r in rows for t in r["response_tokens"]]
        summary["mean_response_tokens"] = float(np.mean(tokens))
        summary["truncated_share"] = float(np.mean([t for r in rows for t in r["truncated"]]))
        summary["no_answer_share"] = float(np.mean([a is None for r in rows for a in r["answers"]]))
    else:
        summary["score"] = None
    return summary


def _fmt(value) -> str:
    return "missing" if value is None else f"{value:.1f}"


def group_average(summaries: dict, names: Sequence[str]) -> tuple[Optional[float], list[str]]:
    """Mean score over names, or None listing the benchmarks without a score."""
    absent = [n for n in names if summaries.get(n, {}).get("score") is None]
    if absent or not names:
        return None, absent
    return float(np.mean([summaries[n]["score"] for n in names])), []


def markdown_table(summaries: dict, label: str) -> str:
    """The paper's table: eight benchmarks in order, Math avg and Visual avg."""
    math_names, visual_names = benchmarks_lib.MATH_BENCHMARKS, benchmarks_lib.VISUAL_BENCHMARKS
    header = ["model", *[benchmarks_lib.BENCHMARKS[n].display for n in math_names], "Math avg",
              *[benchmarks_lib.BENCHMARKS[n].display for n in visual_names], "Visual avg"]
    math_avg, math_absent = group_average(summaries, math_names)
    visual_avg, visual_absent = group_average(summaries, visual_names)

    def cell(name):
        s = summaries.get(name)
        if s is None:
            return "not run"
        if s["status"] != "ok":
            return s["status"]
        return _fmt(s["score"])

    row = [label, *[cell(n) for n in math_names], _fmt(math_avg) if math_avg is not None else "n/a",
           *[cell(n) for n in visual_names], _fmt(visual_avg) if visual_avg is not None else "n/a"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]
    k = next((s.get("num_samples") for s in summaries.values() if s.get("num_samples")), None)
    if k:
        lines.append(f"avg@{k}; scores in %, OCRBench as points/10.")
    for name, s in summaries.items():
        if s["status"] == "missing":
            lines.append(f"- {s.get('display', name)}: missing ({s.get('reason', '')}); averages over it are n/a.")
        elif s["status"] not in ("ok",):
            lines.append(f"- {s.get('display', name)}: {s['status']} ({s.get('reason', '')}).")
        elif s.get("skipped"):
            lines.append(f"- {s['display']}: {s['skipped']} of {s['records']} questions skipped "
                         f"(bad image / file / prompt; see summary.json) and not scored.")
        if s.get("status") == "ok" and s.get("extraction", "").startswith("rule-based fallback"):
            lines.append(f"- {s['display']}: rule-based extraction instead of the official LLM judge.")
        if s.get("status") == "ok":
            lines.extend(scoring_notes(s))
    if math_absent:
        lines.append(f"- Math avg n/a: no score for {', '.join(math_absent)}.")
    if visual_absent:
        lines.append(f"- Visual avg n/a: no score for {', '.join(visual_absent)}.")
    return "\n".join(lines) + "\n"


def scoring_notes(s: dict) -> list[str]:
    """results.md lines saying how a benchmark's samples were scored (official leniency or strict)."""
    lines = []
    applied = sum((s.get("leniency_samples") or {}).values())
    if s.get("leniency"):
        lines.append(f"- {s['display']}: official scoring, {s['leniency']}"
                     + (f"; decided {applied} samples." if applied else "."))
    elif s.get("scoring") == "strict":
        lines.append(f"- {s['display']}: strict scoring (no official leniency).")
    if "official_groups" in s and s.get("groups") != s["official_groups"]:
        lines.append(f"- {s['display']}: {s.get('groups')} complete groups of the official {s['official_groups']} "
                     f"({s.get('incomplete_groups', 0)} incomplete); strict/loose over the complete ones.")
    if "accuracy_l2_categories" in s:
        other = s["accuracy_l2_categories"]
        lines.append(f"- {s['display']}: score = mean over "
                     + ("all questions (VLMEvalKit)" if s.get("average") == "rows" else "l2 categories (lmms-eval)")
                     + f"; over all questions {s['accuracy_rows']:.1f}, over l2 categories "
                     + ("n/a" if other is None else f"{other:.1f}") + ".")
    if "no_figure_questions" in s:
        lines.append(f"- {s['display']}: fAcc over {s['figures']} figures ({s['no_figure_questions']} no-figure "
                     "VS questions left out of fAcc, official get_eval_fig).")
    return lines


# ----------------------------------------------------------------------------- model


def load_model(config, mesh=None):
    """Qwen3VL from config.model: a Hugging Face directory (config.json + safetensors)."""
    import jax.numpy as jnp

    from vaopd_jax.models import qwen3_vl

    path = resolve_model_dir(config)
    loader = getattr(qwen3_vl, "load_hf_checkpoint", None)
    if loader is None:
        from vaopd_jax.models.qwen3_vl import convert

        loader = convert.load_hf_checkpoint
    return loader(str(path), dtype=jnp.dtype(config.dtype), mesh=mesh)


def resolve_model_dir(config) -> Path:
    """config.model as a Hugging Face directory: itself, or a training workdir's export/<config.export>."""
    path = Path(config.model)
    if (path / "config.json").is_file():
        return path
    exported = path / "export" / config.export
    if (exported / "config.json").is_file():
        return exported
    raise EvalConfigError(
        f"config.model = {config.model!r}: neither a Hugging Face checkpoint directory (config.json) nor a "
        f"training workdir with export/{config.export}/config.json")


def local_mesh(config):
    """A (data, fsdp, expert, tensor) mesh over this process's devices, or None for one device.

    Evaluation never crosses hosts: each process runs the model on its local devices.
    config.mesh.data = -1 takes every local device not used by fsdp x expert x tensor; config.mesh.expert
    (default 1) splits a mixture-of-experts model's experts over that many devices.
    """
    import jax

    from vaopd_jax.parallel.mesh import MESH_AXES

    devices = jax.local_devices()
    data, fsdp, tensor = int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)
    expert = int(config.mesh.expert)
    fixed = fsdp * expert * tensor
    shape = f"data={data}, fsdp={fsdp}, expert={expert}, tensor={tensor}"
    if min(fsdp, expert, tensor) < 1 or (data < 1 and data != -1):
        raise EvalConfigError(f"config.mesh = ({shape}): each must be >= 1 (data may be -1: all remaining local "
                              "devices)")
    if data == -1:
        if len(devices) % fixed:
            raise EvalConfigError(f"config.mesh fsdp={fsdp} x expert={expert} x tensor={tensor} does not divide the "
                                  f"{len(devices)} local devices")
        data = len(devices) // fixed
    count = data * fixed
    if count > len(devices):
        raise EvalConfigError(f"config.mesh asks for {data}x{fsdp}x{expert}x{tensor} = {count} devices; this process "
                              f"has {len(devices)}")
    if count == 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:count]).reshape(data, fsdp, expert, tensor), MESH_AXES)


def _tokenizer_for(config):
    from vaopd_jax.data import tokenizer as tokenizer_lib

    if config.tokenizer_path:
        return tokenizer_lib.load_tokenizer(config.tokenizer_path)
    model_dir = resolve_model_dir(config) if config.model else None
    if model_dir is not None and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return tokenizer_lib.load_tokenizer(str(model_dir))
    return tokenizer_lib.load_tokenizer(None)


class Runtime:
    """Tokenizer, model and the evaluation `rollout.Sampler` (built once), loaded on first call: a run whose
    benchmarks are all missing (or already scored) loads nothing. Calling returns {tokenizer, model, params,
    sampler, eos_ids, max_positions}."""

    def __init__(self, config, model=None, tokenizer=None, mesh=None):
        self.config, self.model, self.tokenizer, self.mesh = config, model, tokenizer, mesh
        self.loaded: dict = {}

    def __call__(self) -> dict:
        if not self.loaded:
            from flax import nnx

            from vaopd_jax.data import tokenizer as tokenizer_lib
            from vaopd_jax.rollout import sampler

            tok = self.tokenizer if self.tokenizer is not None else _tokenizer_for(self.config)
            if self.model is None:
                mdl = load_model(self.config, mesh=self.mesh)
            elif self.mesh is not None:
                from vaopd_jax.models.qwen3_vl import sharding as model_sharding

                mdl = model_sharding.shard_model(self.model, self.mesh)
            else:
                mdl = self.model
            c = self.config
            eos_ids = tokenizer_lib.END_TOKEN_IDS
            rollouts = sampler.Sampler(
                mdl, max_new_tokens=c.max_new_tokens, num_samples=c.num_samples, temperature=c.temperature,
                top_p=c.top_p, top_k=c.top_k, eos_token_ids=eos_ids, mesh=self.mesh,
                valid_vocab_size=tokenizer_lib.valid_vocab_size(tok, mdl.config.text.vocab_size))
            self.loaded = dict(tokenizer=tok, model=mdl, params=nnx.state(mdl, nnx.Param), sampler=rollouts,
                               eos_ids=eos_ids, max_positions=getattr(mdl.config.text, "max_position_embeddings", None))
        return self.loaded


# ----------------------------------------------------------------------------- main entry


def evaluate(config, model=None, tokenizer=None, *, model_name: Optional[str] = None) -> dict:
    """Runs the evaluation described by ``config``; returns the summary dict.

    model / tokenizer: pass them in-process (tests, notebooks), else they are loaded from
    config.model / config.tokenizer_path. Process 0 writes summary.json and results.md.
    """
    import jax

    if not isinstance(config, config_lib.EvaluateConfig):
        config = config_lib.load_evaluate(config)  # every problem at once, before any compute
    out_dir = Path(config.output_dir)
    process_index, process_count = jax.process_index(), jax.process_count()
    names = config.benchmarks
    model_name = model_name or config.model or "in-process model"
    check_run_settings(out_dir, config, model_name)
    judge = make_judge(config.judge.url, config.judge.model, api_key_env=config.judge.api_key_env,
                       timeout_s=config.judge.timeout_s)
    from vaopd_jax.parallel import backend as backend_lib

    # The backend and device kind, and a warning when a GPU/TPU config (bf16, a multi-device mesh) lands on CPU.
    devices_line, backend_warnings = backend_lib.startup_report(
        backend_lib.backend_info(), dtype=config.dtype,
        mesh_shape=config.mesh.shape())
    log.info("%s", devices_line)
    for warning in backend_warnings:
        log.warning("%s", warning)
    mesh = local_mesh(config)
    runtime = Runtime(config, model=model, tokenizer=tokenizer, mesh=mesh)

    statuses: dict = {}
    for name in names:
        bench = benchmarks_lib.get(name)
        try:
            counters = evaluate_benchmark(bench, config, runtime, out_dir, process_index=process_index,
                                          process_count=process_count, judge=judge)
            statuses[name] = {"status": "ok", **counters}
            log.info("%s: %d generated, %d skipped in this process", name, counters["generated"], counters["skipped"])
        except common.MissingBenchmark as err:
            log.warning("%s: missing (%s)", name, err)
            statuses[name] = {"status": "missing", "reason": str(err)}
        except ValueError as err:  # unreadable file / wrong columns: reported, other benchmarks go on
            log.error("%s: cannot be read: %s", name, err)
            statuses[name] = {"status": "error", "reason": str(err)}

    counters = {"judge_calls": judge.calls if judge else 0, "judge_failures": judge.failures if judge else 0,
                **{f"grading_{k}": v for k, v in grading.grading_counters().items()}}
    (out_dir / f"counters.p{process_index}.json").write_text(json.dumps(counters))
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vaopd_jax.evaluate: all slices written")
    if process_index != 0:
        return {}

    summaries: dict = {}
    for name in names:
        bench = benchmarks_lib.get(name)
        if statuses[name]["status"] != "ok":
            summaries[name] = {"display": bench.display, "group": bench.group, "score": None, **statuses[name]}
            continue
        summaries[name] = summarize_benchmark(bench, out_dir, config.num_samples, judge,
                                              ids=statuses[name]["ids"], scoring=scoring_of(config))
    math_avg, _ = group_average(summaries, benchmarks_lib.MATH_BENCHMARKS)
    visual_avg, _ = group_average(summaries, benchmarks_lib.VISUAL_BENCHMARKS)
    totals: dict = {}  # this run's counters, summed over processes
    for index in range(process_count):
        path = out_dir / f"counters.p{index}.json"
        for key, value in (json.loads(path.read_text()) if path.is_file() else {}).items():
            totals[key] = totals.get(key, 0) + value
    summary = {
        "model": model_name,
        "settings": {**{k: getattr(config, k) for k in RUN_KEYS}, "mmstar_average": config.mmstar_average},
        "math_avg": math_avg,
        "visual_avg": visual_avg,
        "judge": judge.describe() if judge else None,
        "judge_calls": totals.get("judge_calls", 0),
        "judge_failures": totals.get("judge_failures", 0),
        "grading": {"timeouts": totals.get("grading_timeouts", 0), "errors": totals.get("grading_errors", 0)},
        "benchmarks": summaries,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    table = markdown_table(summaries, label=Path(model_name).name or model_name)
    (out_dir / "results.md").write_text(table)
    print(table)
    print(f"per-sample JSONL: {out_dir / 'samples'}; summary: {out_dir / 'summary.json'}")
    return summary


def main(argv=None) -> None:
    """`python -m vaopd_jax.evaluate --config configs/eval_default.py[:VARIANT] [--config.a.b=VALUE ...]`: every
    problem of the command line and the config at once, before any compute; exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vaopd_jax.parallel import mesh as mesh_lib

    mesh_lib.maybe_initialize_distributed()  # multi-host init where the environment asks for it
    try:
        config, _ = config_lib.load_command_line(sys.argv[1:] if argv is None else argv, usage=__doc__,
                                                 loader=config_lib.load_evaluate)
    except EvalConfigError as err:
        raise SystemExit(str(err)) from None
    evaluate(config)


if __name__ == "__main__":
    main()
