"""Training-config schema helpers and validation, run before any compute.

The config files in ``configs/`` build an ``ml_collections.ConfigDict`` from
``configs/base.py`` (the paper recipe, spec/METHOD.md "Defaults") and change a
few fields. ``validate(config)`` checks every field the trainer reads and
raises one ``ConfigError`` listing every problem, each naming the field, the
value seen and the allowed range, e.g.::

    config.va.p_v = 1.5: must be in (0, 1] (fraction of a rollout's tokens in the high-VA group, Eq. 5)

Methods (spec/METHOD.md "Ablations"):
  ``va_opd``         rollout reweighting (Eq. 3-4) and token grouping (Eq. 5)
  ``reweight_only``  reweighting, plain token mean inside each rollout
  ``group_only``     grouping, uniform rollout weights 1/K
  ``opd``            standard on-policy distillation (neither)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from vaopd_jax.data import tokenizer as tokenizer_lib
from vaopd_jax.data.processor import IMAGE_PATHS
from vaopd_jax.data.batch import VIEWS as SFT_IMAGES  # the demo warm-ups' view of the images
from vaopd_jax.distill.objective import METHODS, RANGES, REWEIGHTING_METHODS, ObjectiveConfig, Range
from vaopd_jax.models.qwen3_vl.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, Qwen3VLConfig
from vaopd_jax.runtime.watchdog import ACTIONS as WATCHDOG_ACTIONS

DATA_SOURCES = ("synthetic", "geometry3k", "virl39k")
DEMO = "configs/demo.py"  # where the demo-only fields (tiny models, warm-ups, the synthetic task) live
# Model sizes a config may name (<role>.size), checked against a checkpoint's config.json by their text fields:
# width, depth and MLP width for the dense models; width, depth, expert count and expert MLP width for the
# mixture-of-experts ones (their dense intermediate_size is unused when every layer is sparse).
MODEL_SIZES = {"2b": Qwen3VLConfig.qwen3_vl_2b, "4b": Qwen3VLConfig.qwen3_vl_4b, "8b": Qwen3VLConfig.qwen3_vl_8b,
               "32b": Qwen3VLConfig.qwen3_vl_32b, "30b-a3b": Qwen3VLConfig.qwen3_vl_30b_a3b,
               "235b-a22b": Qwen3VLConfig.qwen3_vl_235b_a22b}
_DENSE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size")
_MOE_KEYS = ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size")
MESH_AXES = ("data", "fsdp", "expert", "tensor")  # parallel.mesh.MESH_AXES (config.mesh.<axis>)


def _size_signature(size: str) -> dict:
    text = MODEL_SIZES[size]().text
    return {key: getattr(text, key) for key in (_MOE_KEYS if text.is_moe else _DENSE_KEYS)}


def _text_signature(text: dict) -> dict:
    """The size fields of a config.json's text_config (dense unless it has num_experts > 0)."""
    moe = bool(text.get("num_experts") or text.get("num_local_experts"))
    found = {key: text.get(key) for key in (_MOE_KEYS if moe else _DENSE_KEYS)}
    if moe and found["num_experts"] is None:
        found["num_experts"] = text.get("num_local_experts")
    return found


def _describe(signature: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in signature.items())


class ConfigError(ValueError):
    """A configuration field is missing, out of range or inconsistent."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a big_vision style config argument ``'method=opd,teacher=8b'``.

    Every key must appear in ``defaults``; each value is converted to the type
    of its default (bool accepts true/false/1/0).
    """
    out = dict(defaults)
    if arg:
        for item in arg.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ConfigError(
                    f"config argument {item!r} in {arg!r} is not key=value; known keys: {sorted(defaults)}")
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in defaults:
                raise ConfigError(f"config argument key {key!r} in {arg!r} is unknown; known keys: {sorted(defaults)}")
            default = defaults[key]
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"config argument {key}={value!r}: expected true/false")
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                out[key] = type(default)(value)
            else:
                out[key] = value
    return ml_collections.ConfigDict(out)


def load_sibling(config_file: str, name: str):
    """Imports the config module ``name`` that sits beside ``config_file`` (e.g. ``configs/base.py``).

    Config files are loaded by path (``--config configs/x.py``), so they cannot
    rely on ``configs`` being importable from the current directory.
    """
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"vaopd_configs_{name}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config module {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_spec(*, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vision_depth: int,
              vision_hidden: int, head_dim: int = 32, vocab_size: int = 151936) -> ml_collections.ConfigDict:
    """A tiny Qwen3-VL shape for random-init / demo models (``models.load.config_from_spec(spec)``).

    The real vocabulary and special ids (the offline Qwen tokenizer), tied
    embeddings (halves the 151,936-row tables), an MRoPE section summing to
    head_dim / 2, and deepstack after every vision block but the last.
    """
    quarter = head_dim // 8
    return ml_collections.ConfigDict({
        "text": {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": mlp,
                 "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                 "head_dim": head_dim, "mrope_section": (head_dim // 2 - 2 * quarter, quarter, quarter),
                 "rope_theta": 1_000_000.0},
        "vision": {"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                   "num_heads": 2, "num_position_embeddings": 64,
                   "deepstack_visual_indexes": tuple(range(max(vision_depth - 1, 1)))},
        "tie_word_embeddings": True,
        # Tiny demo models use the real tokenizer, so they keep its special ids (spec/QWEN3VL.md).
        "image_token_id": tokenizer_lib.IMAGE_PAD_ID, "video_token_id": tokenizer_lib.VIDEO_PAD_ID,
        "vision_start_token_id": tokenizer_lib.VISION_START_ID, "vision_end_token_id": tokenizer_lib.VISION_END_ID,
    })


# config.va field -> ObjectiveConfig field: the paper's names (p_v, lambda, tau, eps) on the command line, the
# objective's descriptive ones in code; this table is the one place they meet.
VA_FIELDS = {"p_v": "high_fraction", "lam": "high_weight", "tau": "tau", "eps": "eps"}


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
    """The objective of a (validated) training config: config.method and config.va.*."""
    return ObjectiveConfig(method=config.method, **{field: config.va[name] for name, field in VA_FIELDS.items()})


def hf_vocab_size(path: str) -> int:
    """``text_config.vocab_size`` from a Hugging Face Qwen3-VL ``config.json``."""
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, encoding="utf-8") as f:
        hf = json.load(f)
    text = hf.get("text_config", hf)
    if "vocab_size" not in text:
        raise ConfigError(f"{cfg_file} has no text_config.vocab_size (is it a Qwen3-VL checkpoint?)")
    return int(text["vocab_size"])


class _Checker:
    """Collects every problem so that one run reports all of them at once."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.problems: list[str] = []

    def get(self, name: str, where: str = "configs/base.py") -> Any:
        node: Any = self.config
        for part in name.split("."):
            if part not in node:
                self.problems.append(f"config.{name} is missing (the trainer reads it; start from {where})")
                return None
            node = node[part]
        return node

    def fail(self, name: str, value: Any, rule: str) -> None:
        self.problems.append(f"config.{name} = {value!r}: {rule}")

    def number(self, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False, integer: bool = False, why: str = "", allowed: Range | None = None,
               where: str = "configs/base.py") -> Any:
        value = self.get(name, where)
        if value is None:
            return None
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
            self.fail(name, value, f"must be {'an integer' if integer else 'a finite number'}")
            return None
        allowed = allowed or Range(lo, hi, lo_open=lo_open, hi_open=hi_open, why=why)
        problem = allowed.problem(value)
        if problem:
            self.fail(name, value, problem)
            return None
        return value

    def choice(self, name: str, options: tuple[str, ...], where: str = "configs/base.py") -> Any:
        value = self.get(name, where)
        if value is not None and value not in options:
            self.fail(name, value, f"must be one of {options}")
            return None
        return value

    def boolean(self, name: str) -> Any:
        value = self.get(name)
        if value is not None and not isinstance(value, bool):
            self.fail(name, value, "must be true or false")
            return None
        return value

    def int_list(self, name: str, minimum: int = 1) -> Any:
        value = self.get(name)
        if value is None:
            return None
        values = list(value)
        if not values or any(not isinstance(v, int) or v < minimum for v in values) or values != sorted(set(values)):
            self.fail(name, value, f"must be a non-empty increasing list of integers >= {minimum}")
            return None
        return values


def validate(config: ml_collections.ConfigDict, *, check_paths: bool = True) -> None:
    """Checks every field of a training config; raises ``ConfigError`` listing all problems.

    Args:
      config: a config built from ``configs/base.py``.
      check_paths: also check that teacher/student/data paths exist and that the
        student and teacher vocabularies match (off for unit tests of ranges).
    """
    c = _Checker(config)
    workdir = c.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not workdir.strip()):
        c.fail("workdir", workdir, "must be a non-empty path (pass --config.workdir=DIR)")
    c.number("seed", 0, 2**31 - 1, integer=True)
    method = c.choice("method", METHODS)

    # spec/METHOD.md Eq. 3-5: the objective's own ranges (objective.RANGES).
    for name, field in VA_FIELDS.items():
        c.number(f"va.{name}", allowed=RANGES[field])
    c.number("va.pixelate_ratio", 0, 1, lo_open=True, hi_open=True, why="side fraction of the pixelated view")

    k = c.number("rollout.num_rollouts", 1, None, integer=True)
    if method in REWEIGHTING_METHODS and k is not None and k < 2:
        c.fail("rollout.num_rollouts", k,
               f"must be >= 2 with method={method!r}: rollout weights are a softmax over the K siblings of a "
               "prompt (Eq. 3-4); use method='opd' or 'group_only' for K = 1")
    c.number("rollout.max_new_tokens", 1, None, integer=True)
    c.number("rollout.temperature", 0, None, why="0 means greedy")
    c.number("rollout.top_p", 0, 1, lo_open=True)
    c.number("rollout.top_k", 0, None, integer=True, why="0 disables top-k")

    c.choice("data.source", DATA_SOURCES)
    c.choice("data.val_source", DATA_SOURCES)
    c.number("data.prompts_per_step", 1, None, integer=True)
    c.number("data.num_epochs", 0, None, lo_open=True)
    min_px = c.number("data.min_pixels", 1, None, integer=True)
    max_px = c.number("data.max_pixels", 1, None, integer=True)
    if min_px is not None and max_px is not None and min_px > max_px:
        c.fail("data.min_pixels", min_px, f"must be <= config.data.max_pixels = {max_px}")
    c.choice("data.image_path", IMAGE_PATHS)
    c.int_list("data.prompt_buckets")
    patch_buckets = c.int_list("data.prompt_patch_buckets", minimum=4)
    if patch_buckets is not None and any(b % 4 for b in patch_buckets):
        c.fail("data.prompt_patch_buckets", patch_buckets, "must be multiples of 4 (spatial merge 2 x 2)")
    c.number("data.num_workers", 0, None, integer=True)
    if "synthetic" in (c.get("data.source"), c.get("data.val_source")):  # the demo's task (configs/demo.py)
        c.number("data.synthetic_train_size", 1, None, integer=True, where=DEMO)
        c.number("data.synthetic_fine_fraction", 0, 1, where=DEMO,
                 why="share of fine-detail questions in the synthetic training prompts")
        c.number("data.image_size", 32, None, integer=True, where=DEMO)
        from vaopd_jax.data import synthetic  # the reply knobs (configs/demo.py), checked where a config sets them

        if "synthetic_reply_style" in config.data:
            c.choice("data.synthetic_reply_style", synthetic.REPLY_STYLES, where=DEMO)
            tokens = c.number("data.synthetic_scaffold_tokens", 0, synthetic.MAX_SCAFFOLD_TOKENS, integer=True,
                              where=DEMO)
            if tokens is not None and tokens % synthetic.SCAFFOLD_UNIT:
                c.fail("data.synthetic_scaffold_tokens", tokens, f"must be a multiple of {synthetic.SCAFFOLD_UNIT}")
            c.number("data.synthetic_phrasing_mismatch", 0, 1, where=DEMO)

    c.choice("model.dtype", DTYPES)
    c.choice("model.remat", REMAT_POLICIES)
    c.number("model.kl_chunk_size", 1, None, integer=True)
    c.choice("model.attention_impl", ATTENTION_IMPLS)
    c.number("model.attention_chunk_size", 1, None, integer=True)

    c.number("optim.lr", 0, None, lo_open=True)
    c.number("optim.b1", 0, 1, hi_open=True)
    c.number("optim.b2", 0, 1, hi_open=True)
    c.number("optim.weight_decay", 0, None)
    c.number("optim.clip_norm", 0, None, lo_open=True)
    c.number("optim.warmup_fraction", 0, 1, hi_open=True)

    c.number("train.num_steps", -1, None, integer=True, why="-1 derives it from data.num_epochs")
    if c.get("train.num_steps") == 0:
        c.fail("train.num_steps", 0, "must be >= 1, or -1 to derive it from data.num_epochs")
    c.number("train.log_every", 1, None, integer=True)
    c.number("train.checkpoint_every", 1, None, integer=True)
    c.number("train.keep_checkpoints", 1, None, integer=True)
    c.boolean("train.async_checkpoint")
    c.number("train.max_nonfinite_steps", 1, None, integer=True,
             why="consecutive skipped (non-finite) steps before the run stops")
    c.number("train.peak_tflops_per_device", 0, None, why="0 = look up the device kind for the MFU estimate")
    micro = c.number("train.micro_batch_rollouts", 0, None, integer=True, why="0 = all rollouts at once")
    prompts = c.get("data.prompts_per_step")
    if micro and k and isinstance(prompts, int) and (micro % k or (prompts * k) % micro):
        c.fail("train.micro_batch_rollouts", micro,
               f"must be 0 or a multiple of rollout.num_rollouts = {k} (whole prompts) that divides the step's "
               f"{prompts} x {k} = {prompts * k} rollouts")
    cache_dir = c.get("train.compilation_cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        c.fail("train.compilation_cache_dir", cache_dir, "must be a directory, '' (the default one) or 'none'")
    c.number("train.watchdog.timeout_s", 0, None, why="0 turns the watchdog off")
    c.number("train.watchdog.first_timeout_s", 0, None, why="0 = train.watchdog.timeout_s")
    c.choice("train.watchdog.action", WATCHDOG_ACTIONS)

    c.number("eval.every", 0, None, integer=True, why="0 disables periodic validation")
    c.number("eval.num_problems", 1, None, integer=True)
    c.number("eval.num_samples", 1, None, integer=True)
    c.number("eval.temperature", 0, None)
    c.number("eval.top_p", 0, 1, lo_open=True)
    c.number("eval.max_new_tokens", 1, None, integer=True)
    c.number("eval.batch_size", 1, None, integer=True)

    for axis in MESH_AXES:
        why = "-1 takes the remaining devices" + ("; a MoE teacher's experts are split over it" if axis == "expert" else "")
        value = c.number(f"mesh.{axis}", -1, None, integer=True, why=why)
        if value == 0:
            c.fail(f"mesh.{axis}", 0, "must be >= 1 or -1")
    if sum(1 for a in MESH_AXES if c.get(f"mesh.{a}") == -1) > 1:
        c.problems.append(f"config.mesh: at most one of {'/'.join(MESH_AXES)} may be -1")

    student_init = c.choice("student.init", ("hf", "random", "sft"))
    teacher_init = c.choice("teacher.init", ("hf", "sft"))
    for role in ("student", "teacher"):
        size = c.get(f"{role}.size")
        if size not in (None, "") and size not in MODEL_SIZES:
            c.fail(f"{role}.size", size, f"must be '' (any) or one of {tuple(MODEL_SIZES)}")
    if student_init in ("random", "sft"):
        c.get("student.tiny", DEMO)
    for role, used in (("teacher", teacher_init == "sft"), ("student", student_init == "sft")):
        if used:  # the demo's warm-ups (configs/demo.py)
            c.number(f"{role}.sft.steps", 1, None, integer=True, where=DEMO)
            c.number(f"{role}.sft.lr", 0, None, lo_open=True, where=DEMO)
            c.number(f"{role}.sft.batch_size", 1, None, integer=True, where=DEMO)
            c.number(f"{role}.sft.image_word_weight", 0, None, lo_open=True, where=DEMO,
                     why="loss weight of the reply words that depend on the image")
            c.number(f"{role}.sft.fine_fraction", 0, 1, where=DEMO,
                     why="share of fine-detail questions in the warm-up data")
            c.choice(f"{role}.sft.images", SFT_IMAGES, where=DEMO)
            for name in ("aux_fraction", "pixelated_share", "texture_label_rate"):  # optional (configs/demo.py)
                if name in config[role].sft:
                    c.number(f"{role}.sft.{name}", 0, 1, where=DEMO)
            if "vision_init" in config[role].sft:
                c.choice(f"{role}.sft.vision_init", ("random", "teacher") if role == "student" else ("random",),
                         where=DEMO)
            if c.get("data.source") != "synthetic":
                c.fail("data.source", c.get("data.source"), f"must be 'synthetic' when {role}.init='sft' "
                       "(the demo warm-up is defined on the synthetic task)")
    if "task_vocabulary" in config.get("data", {}) and c.boolean("data.task_vocabulary"):  # configs/demo.py
        rules = (("teacher.init", teacher_init, ("sft",)), ("student.init", student_init, ("random", "sft")),
                 ("data.source", c.get("data.source"), ("synthetic",)),
                 ("data.val_source", c.get("data.val_source"), ("synthetic",)),
                 ("data.num_workers", c.get("data.num_workers"), (0,)))
        for name, value, allowed in rules:
            if value not in allowed:
                c.fail(name, value, f"must be one of {allowed} with data.task_vocabulary=True (the tiny models built "
                       "here get the synthetic task's compact vocabulary; grain workers would reload the full "
                       "tokenizer)")
    if check_paths:
        _check_paths(c, student_init, teacher_init)
    if c.problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(c.problems))


def _read_text_config(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    return hf.get("text_config", hf)


def _check_size(c: _Checker, role: str, path: str) -> None:
    """The checkpoint's config.json against ``<role>.size`` (a paper variant names its teacher's size)."""
    size = c.get(f"{role}.size")
    if not size or size not in MODEL_SIZES:
        return
    found = _text_signature(_read_text_config(path))
    expected = _size_signature(size)
    if found != expected:
        named = [name for name in MODEL_SIZES if _size_signature(name) == found]
        what = f"a Qwen3-VL-{named[0].upper()}" if named else "no Qwen3-VL size this project knows"
        c.fail(f"{role}.hf_path", path,
               f"its config.json is {what} (text {_describe(found)}) but config.{role}.size = {size!r} expects "
               f"{_describe(expected)}: point {role}.hf_path at the Qwen3-VL-{size.upper()} checkpoint"
               + (f" or pick the variant {role}={named[0]}" if named and role == "teacher" else ""))


def _check_experts(c: _Checker, path: str) -> None:
    """mesh.expert > 1 splits the experts of the teacher's MoE layers: it must divide their number."""
    expert = c.get("mesh.expert")
    if isinstance(expert, int) and not isinstance(expert, bool) and expert > 1:
        problem = expert_axis_problem(path, expert)
        if problem:
            c.fail("mesh.expert", expert, problem)


def expert_axis_problem(path: str, expert: int) -> str | None:
    """Why an 'expert' mesh axis of size `expert` cannot split the experts of the MoE checkpoint at `path` (None
    when it can, or when the checkpoint is dense: there the axis is one more FSDP axis)."""
    experts = _text_signature(_read_text_config(path)).get("num_experts")
    if experts and experts % expert:
        return (f"an expert axis of {expert} devices must divide the teacher's {experts} experts "
                f"({path}/config.json); pick a divisor of {experts}, or 1")
    return None


def _check_paths(c: _Checker, student_init: str | None, teacher_init: str | None) -> None:
    # Each model's vocabulary: from its checkpoint's config.json, or from the demo's tiny spec.
    vocab = {}
    tiny = {"teacher": "teacher.sft.tiny", "student": "student.tiny"}
    for role, init, other in (("teacher", teacher_init, "teacher.init='sft', the demo teacher"),
                              ("student", student_init, "student.init='random' / 'sft'")):
        path = c.get(f"{role}.hf_path")
        if init == "hf" and (not path or not os.path.isfile(os.path.join(str(path), "config.json"))):
            c.fail(f"{role}.hf_path", path, "must be a local Hugging Face Qwen3-VL directory with config.json "
                   f"(or configs/demo.py's {other})")
        elif init == "hf":
            vocab[role] = hf_vocab_size(path)
            _check_size(c, role, str(path))
            if role == "teacher":
                _check_experts(c, str(path))
        elif init in ("random", "sft"):
            vocab[role] = c.get(f"{tiny[role]}.text.vocab_size", DEMO)
    teacher_vocab, student_vocab = vocab.get("teacher"), vocab.get("student")
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        c.problems.append(
            f"student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab}: the token KL "
            "(Eq. 1) compares distributions over one vocabulary; pick a student and teacher of one family")
    for split, source_field in (("train_path", "source"), ("val_path", "val_source")):
        path = c.get(f"data.{split}")
        source = c.get(f"data.{source_field}")
        if source != "synthetic" and (not path or not os.path.exists(str(path))):
            c.fail(f"data.{split}", path,
                   f"must be an existing file or directory for data.{source_field}={source!r}")
    tokenizer = c.get("tokenizer_path")
    if tokenizer and not os.path.isdir(str(tokenizer)):
        c.fail("tokenizer_path", tokenizer, "must be a local tokenizer directory, or '' for the offline Qwen tokenizer")
