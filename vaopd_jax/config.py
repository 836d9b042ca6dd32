"""The training config: one typed object, validated once at the entry points.

The config files in ``configs/`` build an ``ml_collections.ConfigDict`` (every field overridable on the command
line) from ``configs/base.py`` (the paper's recipe) and change a few fields. ``load(config_dict)`` checks every
field, turns the tree into the frozen dataclasses below (`Config` and its parts) and raises one ``ConfigError``
listing every problem at once, each naming the field, the value seen and the allowed range, e.g.::

    config.va.p_v = 1.5: must be in (0, 1] (p_v, fraction of a rollout's tokens in the high-VA group, Eq. 5)

Nothing below the entry points (train, study, evaluate, the demo's warm-ups) sees the ConfigDict: the model
loader gets a `ModelConfig`, the sampler a `RolloutConfig`, the objective an `ObjectiveConfig`
(`Config.objective()`), the data code the typed `Config`.

Methods (docs/method.md, "Ablations"):
  ``va_opd``         rollout reweighting (Eq. 3-4) and token grouping (Eq. 5)
  ``reweight_only``  reweighting, plain token mean inside each rollout
  ``group_only``     grouping, uniform rollout weights
  ``opd``            standard on-policy distillation (neither)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any

import ml_collections

from vaopd_jax.data import synthetic
from vaopd_jax.data import tokenizer as tokenizer_lib
from vaopd_jax.data.batch import VIEWS as SFT_IMAGES  # the demo warm-ups' view of the images
from vaopd_jax.data.processor import IMAGE_PATHS
from vaopd_jax.eval import benchmarks as benchmarks_lib
from vaopd_jax.distill.objective import METHODS, RANGES, REWEIGHTING_METHODS, ObjectiveConfig, Range
from vaopd_jax.models.qwen3_vl.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, Qwen3VLConfig
from vaopd_jax.runtime.watchdog import ACTIONS as WATCHDOG_ACTIONS

DATA_SOURCES = ("synthetic", "geometry3k", "virl39k")
BASE = "configs/base.py"
EVAL = "configs/eval_default.py"
DEMO = "configs/demo.py"  # where the demo-only fields (tiny models, warm-ups, the synthetic task) live
MESH_AXES = ("data", "fsdp", "expert", "tensor")  # parallel.mesh.MESH_AXES (config.mesh.<axis>)
# Model sizes a config may name (<role>.size), checked against a checkpoint's config.json by their text fields:
# width, depth and MLP width for the dense models; width, depth, expert count and expert MLP width for the
# mixture-of-experts ones (their dense intermediate_size is unused when every layer is sparse).
MODEL_SIZES = {"2b": Qwen3VLConfig.qwen3_vl_2b, "4b": Qwen3VLConfig.qwen3_vl_4b, "8b": Qwen3VLConfig.qwen3_vl_8b,
               "32b": Qwen3VLConfig.qwen3_vl_32b, "30b-a3b": Qwen3VLConfig.qwen3_vl_30b_a3b,
               "235b-a22b": Qwen3VLConfig.qwen3_vl_235b_a22b}
_DENSE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size")
_MOE_KEYS = ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size")


class ConfigError(ValueError):
    """A configuration field is missing, out of range or inconsistent."""


# ----------------------------------------------------------------------------- the schema
def _field(kind: str, *, lo=None, hi=None, lo_open=False, hi_open=False, why="", choices=None, allowed=None,
           where: str = BASE, default=dataclasses.MISSING, **extra):
    """A config field: its kind ('int' | 'float' | 'bool' | 'str' | 'ints' | 'sub' | 'tiny'), its allowed values
    (a range, or choices) and the config file that defines it (named when it is missing)."""
    rng = allowed or (Range(lo, hi, lo_open=lo_open, hi_open=hi_open, why=why)
                      if lo is not None or hi is not None else None)
    meta = {"kind": kind, "range": rng, "choices": choices, "where": where, "why": why, **extra}
    return dataclasses.field(default=default, metadata=meta)


def _sub(cls, *, optional: bool = False, where: str = BASE):
    return _field("sub", cls=cls, where=where, default=None if optional else dataclasses.MISSING)


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """The demo's supervised warm-up of a tiny model on the synthetic task (vaopd_jax/sft.py).

    steps >= 1; lr > 0; batch_size >= 1; image_word_weight > 0: the loss weight of the reply words that depend on
    the image; fine_fraction in [0, 1]: share of fine-detail questions; images: the view learnt from (original |
    pixelated | pixelated_fine); output_dir: where the model is cached ('' = <workdir>/<role>_sft); the rest
    (defaults: a plain warm-up) make the demo's student partly sighted.
    """

    steps: int = _field("int", lo=1, where=DEMO)
    lr: float = _field("float", lo=0, lo_open=True, where=DEMO)
    batch_size: int = _field("int", lo=1, where=DEMO)
    image_word_weight: float = _field("float", lo=0, lo_open=True, where=DEMO,
                                      why="loss weight of the reply words that depend on the image")
    fine_fraction: float = _field("float", lo=0, hi=1, where=DEMO, why="share of fine-detail questions")
    images: str = _field("str", choices=SFT_IMAGES, where=DEMO)
    output_dir: str = _field("str", where=DEMO)
    # The partly sighted student (docs/study.md): the auxiliary texture question, a share of prompts shown
    # pixelated, the share of fine replies that name the image's texture, and the vision tower's start and training.
    aux_fraction: float = _field("float", lo=0, hi=1, where=DEMO, default=0.0,
                                 why="share of auxiliary texture questions")
    pixelated_share: float = _field("float", lo=0, hi=1, where=DEMO, default=0.0)
    texture_label_rate: float = _field("float", lo=0, hi=1, where=DEMO, default=1.0)
    vision_init: str = _field("str", choices=("random", "teacher"), where=DEMO, default="random")
    train_vision: bool = _field("bool", where=DEMO, default=True)


@dataclasses.dataclass(frozen=True)
class RoleConfig:
    """The student or the teacher. init: 'hf' (hf_path, a Hugging Face Qwen3-VL directory), 'sft' (a tiny model
    taught the synthetic task first, `sft`) or, for the student, 'random' (a random tiny model); size: '' or a
    MODEL_SIZES name checked against hf_path's config.json; tiny: the tiny shape (a `tiny_spec`, demo only)."""

    init: str = _field("str", choices=("hf", "sft", "random"))
    hf_path: str = _field("str")
    size: str = _field("str", choices=("",) + tuple(MODEL_SIZES))
    tiny: Qwen3VLConfig | None = _field("tiny", where=DEMO, default=None)
    sft: SftConfig | None = _sub(SftConfig, optional=True, where=DEMO)


@dataclasses.dataclass(frozen=True)
class VAConfig:
    """The visual advantage's hyper-parameters (Eq. 2-5) and the pixelated view: p_v, lam, tau, eps
    (`objective.RANGES`), pixelation_ratio in (0, 1) (side fraction of the pixelated view)."""

    p_v: float = _field("float", allowed=RANGES["high_fraction"])
    lam: float = _field("float", allowed=RANGES["high_weight"])
    tau: float = _field("float", allowed=RANGES["tau"])
    eps: float = _field("float", allowed=RANGES["eps"])
    pixelation_ratio: float = _field("float", lo=0, hi=1, lo_open=True, hi_open=True,
                                     why="side fraction of the pixelated view")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Student rollouts (`rollout.Sampler`): num_rollouts per prompt, max_new_tokens, temperature (0 = greedy),
    top_p in (0, 1], top_k (0 = off)."""

    num_rollouts: int = _field("int", lo=1)
    max_new_tokens: int = _field("int", lo=1)
    temperature: float = _field("float", lo=0, why="0 means greedy")
    top_p: float = _field("float", lo=0, hi=1, lo_open=True)
    top_k: int = _field("int", lo=0, why="0 disables top-k")

    def sampler_settings(self) -> dict:
        """`rollout.Sampler` keyword arguments."""
        return dict(max_new_tokens=self.max_new_tokens, num_samples=self.num_rollouts, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompts: the record sources (`data.splits`), the image bounds and path, the static buckets."""

    source: str = _field("str", choices=DATA_SOURCES)
    train_path: str = _field("str")
    val_source: str = _field("str", choices=DATA_SOURCES)
    val_path: str = _field("str")
    prompts_per_step: int = _field("int", lo=1)
    num_epochs: float = _field("float", lo=0, lo_open=True)
    min_pixels: int = _field("int", lo=1)
    max_pixels: int = _field("int", lo=1)
    image_path: str = _field("str", choices=IMAGE_PATHS)
    prompt_buckets: tuple[int, ...] = _field("ints", minimum=1)
    prompt_patch_buckets: tuple[int, ...] = _field("ints", minimum=4)
    num_workers: int = _field("int", lo=0)
    # The synthetic task (configs/demo.py).
    synthetic_train_size: int | None = _field("int", lo=1, where=DEMO, default=None)
    synthetic_fine_fraction: float | None = _field("float", lo=0, hi=1, where=DEMO, default=None,
                                                   why="share of fine-detail questions in the training prompts")
    image_size: int | None = _field("int", lo=32, where=DEMO, default=None)
    task_vocabulary: bool = _field("bool", where=DEMO, default=False)
    # The synthetic task's taught replies (data/synthetic.py `Replies`): natural (20-60 tokens) or scaffold
    # (synthetic_scaffold_tokens of filler, a multiple of synthetic.SCAFFOLD_UNIT, then a short core), a share
    # synthetic_phrasing_mismatch of the filler phrased differently by the teacher's and the student's warm-ups.
    synthetic_reply_style: str = _field("str", choices=synthetic.REPLY_STYLES, where=DEMO, default="natural")
    synthetic_scaffold_tokens: int = _field("int", lo=0, hi=synthetic.MAX_SCAFFOLD_TOKENS, where=DEMO, default=0)
    synthetic_phrasing_mismatch: float = _field("float", lo=0, hi=1, where=DEMO, default=0.0)
    shuffle: bool = _field("bool", default=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """How the models run (chosen by the run, whatever the checkpoint says): dtype of params and matmuls,
    rematerialisation, KL chunk, attention kernel and its chunk."""

    dtype: str = _field("str", choices=DTYPES)
    remat: str = _field("str", choices=REMAT_POLICIES)
    kl_chunk_size: int = _field("int", lo=1)
    attention_impl: str = _field("str", choices=ATTENTION_IMPLS)
    attention_chunk_size: int = _field("int", lo=1)

    def runtime_options(self) -> dict:
        """The model-config fields the run chooses (`Qwen3VLConfig.replace(**options)`)."""
        return {"attention_impl": self.attention_impl, "attention_chunk_size": self.attention_chunk_size}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping, linear warm-up and cosine decay (`distill.state.make_optimizer`)."""

    lr: float = _field("float", lo=0, lo_open=True)
    b1: float = _field("float", lo=0, hi=1, hi_open=True)
    b2: float = _field("float", lo=0, hi=1, hi_open=True)
    weight_decay: float = _field("float", lo=0)
    clip_norm: float = _field("float", lo=0, lo_open=True)
    warmup_fraction: float = _field("float", lo=0, hi=1, hi_open=True)


@dataclasses.dataclass(frozen=True)
class WatchdogConfig:
    timeout_s: float = _field("float", lo=0, why="0 turns the watchdog off")
    first_timeout_s: float = _field("float", lo=0, why="0 = train.watchdog.timeout_s")
    action: str = _field("str", choices=WATCHDOG_ACTIONS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps (-1 = from data.num_epochs), logging, checkpoints, non-finite steps, micro-batches,
    the compilation cache, the watchdog and the mechanism logging of the step (`distill.step.StepConfig`)."""

    num_steps: int = _field("int", lo=-1, why="-1 derives it from data.num_epochs")
    log_every: int = _field("int", lo=1)
    checkpoint_every: int = _field("int", lo=1)
    keep_checkpoints: int = _field("int", lo=1)
    async_checkpoint: bool = _field("bool")
    max_nonfinite_steps: int = _field("int", lo=1, why="consecutive skipped (non-finite) steps before the run stops")
    peak_tflops_per_device: float = _field("float", lo=0, why="0 = look up the device kind for the MFU estimate")
    micro_batch_rollouts: int = _field("int", lo=0, why="0 = all rollouts at once")
    compilation_cache_dir: str = _field("str", why="a directory, '' (the default one) or 'none'")
    watchdog: WatchdogConfig = _sub(WatchdogConfig)
    # Mechanism logging (the miniature's study turns it on): the teacher's pixelated pass and the VA metrics also
    # for standard OPD; the share of the loss's gradient on the vision-critical tokens (one more student pass).
    log_visual_advantage: bool = _field("bool", default=False)
    log_token_gradients: bool = _field("bool", default=False)
    # Fields a resume may change (runtime/checkpoint.py checks each name against the checkpoint's record).
    resume_across_changes: tuple[str, ...] = _field("strs", default=())


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic validation (every 0 = off): problems, samples per problem (avg@k), sampling, batch size."""

    every: int = _field("int", lo=0, why="0 disables periodic validation")
    num_problems: int = _field("int", lo=1)
    num_samples: int = _field("int", lo=1)
    temperature: float = _field("float", lo=0)
    top_p: float = _field("float", lo=0, hi=1, lo_open=True)
    max_new_tokens: int = _field("int", lo=1)
    batch_size: int = _field("int", lo=1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis (-1: the remaining devices, at most one axis); a MoE teacher's experts split over
    `expert`."""

    data: int = _field("int", lo=-1, why="-1 takes the remaining devices")
    fsdp: int = _field("int", lo=-1, why="-1 takes the remaining devices")
    expert: int = _field("int", lo=-1, why="-1 takes the remaining devices; a MoE teacher's experts are split over it")
    tensor: int = _field("int", lo=-1, why="-1 takes the remaining devices")

    def shape(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.expert, self.tensor)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    final: bool = _field("bool")
    best: bool = _field("bool")


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated training config (`load`). Every part is a frozen dataclass; see configs/base.py for the
    meaning and the paper's value of each field."""

    workdir: str = _field("str")
    seed: int = _field("int", lo=0, hi=2**31 - 1)
    method: str = _field("str", choices=METHODS)
    tokenizer_path: str = _field("str")
    student: RoleConfig = _sub(RoleConfig)
    teacher: RoleConfig = _sub(RoleConfig)
    va: VAConfig = _sub(VAConfig)
    rollout: RolloutConfig = _sub(RolloutConfig)
    data: DataConfig = _sub(DataConfig)
    model: ModelConfig = _sub(ModelConfig)
    optim: OptimConfig = _sub(OptimConfig)
    train: TrainConfig = _sub(TrainConfig)
    eval: EvalConfig = _sub(EvalConfig)
    mesh: MeshConfig = _sub(MeshConfig)
    export: ExportConfig = _sub(ExportConfig)

    def objective(self) -> ObjectiveConfig:
        """The method and its VA hyper-parameters: the paper's names (p_v, lambda) meet the objective's here."""
        va = self.va
        return ObjectiveConfig(method=self.method, high_fraction=va.p_v, high_weight=va.lam, tau=va.tau, eps=va.eps)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- building and checking
class _Broken(TypeError):
    """A rule touched a field that already has a problem of its own: the rule is skipped."""


class _Invalid:
    """Stands in for a wrong or missing field, so that the other rules still run (every problem at once); any
    use of it raises _Broken."""

    def _broken(self, *args, **kwargs):
        raise _Broken("invalid field")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __mod__ = __rmod__ = __mul__ = __rmul__ = _broken
    __add__ = __radd__ = __sub__ = __rsub__ = __iter__ = __len__ = __contains__ = __index__ = __int__ = _broken
    __hash__ = None

    def __getattr__(self, name):
        raise _Broken(name)


INVALID = _Invalid()


@contextlib.contextmanager
def _rule():
    """One cross-field rule: skipped when a field it reads already failed."""
    try:
        yield
    except _Broken:
        pass


class _Problems(list):
    def fail(self, name: str, value: Any, rule: str) -> None:
        self.append(f"config.{name} = {value!r}: {rule}")


def _number(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _value(name: str, value: Any, meta: dict, problems: _Problems) -> Any:
    """One leaf, checked; INVALID (with a problem) when it is wrong."""
    kind = meta["kind"]
    if kind in ("int", "float"):
        if not _number(value, kind):
            problems.fail(name, value, "must be an integer" if kind == "int" else "must be a finite number")
            return INVALID
        problem = meta["range"].problem(value) if meta["range"] else None
        if problem:
            problems.fail(name, value, problem)
            return INVALID
        return float(value) if kind == "float" else int(value)
    if kind == "bool":
        if not isinstance(value, bool):
            problems.fail(name, value, "must be true or false")
            return INVALID
        return value
    if kind == "str":
        if not isinstance(value, str):
            problems.fail(name, value, "must be a string" + (f": {meta['why']}" if meta["why"] else ""))
            return INVALID
        if meta["choices"] is not None and value not in meta["choices"]:
            problems.fail(name, value, f"must be one of {tuple(meta['choices'])}")
            return INVALID
        return value
    if kind == "ints":
        minimum = meta["minimum"]
        values = list(value) if isinstance(value, (list, tuple)) else None
        if (not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values)
                or values != sorted(set(values))):
            problems.fail(name, value, f"must be a non-empty increasing list of integers >= {minimum}")
            return INVALID
        return tuple(int(v) for v in values)
    if kind == "strs":
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if items is None or not all(isinstance(v, str) for v in items):
            problems.fail(name, value, "must be a comma-separated list of field names")
            return INVALID
        return tuple(v.strip() for v in items if v.strip())
    if kind == "names":
        names = ([n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else
                 list(value) if isinstance(value, (list, tuple)) else None)
        unknown = None if names is None else [n for n in names if n not in meta["choices"]]
        if not names or unknown:
            problems.fail(name, value, f"must be a comma-separated subset of {list(meta['choices'])}")
            return INVALID
        return tuple(names)
    if kind == "paths":
        mapping = dict(value) if isinstance(value, (ml_collections.ConfigDict, dict)) else None
        if mapping is None or any(k not in meta["choices"] or not isinstance(v, str) for k, v in mapping.items()):
            problems.fail(name, value, f"must map benchmark names {list(meta['choices'])} to directories")
            return INVALID
        return dict(mapping)
    if kind == "tiny":
        try:
            return model_config_from_spec(value)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            problems.fail(name, "<tiny spec>", f"is not a valid tiny_spec ({err}); build it with config.tiny_spec")
            return INVALID
    raise AssertionError(kind)


def _build(cls, node, path: str, problems: _Problems):
    """The dataclass `cls` from a ConfigDict node, INVALID in place of each wrong or missing field; every
    problem of the subtree is recorded."""
    prefix = f"{path}." if path else ""
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
        problems.append(f"config.{path} = {node!r}: must be a group of fields")
        return INVALID
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in fields:
            problems.append(f"config.{prefix}{key}: unknown field (the fields of config.{path or '<root>'} are "
                            f"{', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        meta = f.metadata
        if name not in node or node[name] is None:
            if f.default is not dataclasses.MISSING:
                values[name] = f.default
            else:
                problems.append(f"config.{prefix}{name} is missing (the trainer reads it; start from {meta['where']})")
                values[name] = INVALID
        elif meta["kind"] == "sub":
            values[name] = _build(meta["cls"], node[name], prefix + name, problems)
        else:
            values[name] = _value(prefix + name, node[name], meta, problems)
    return cls(**values)


def load(config: ml_collections.ConfigDict, *, check_paths: bool = True, device_count: int | None = None,
         process_count: int = 1) -> Config:
    """The typed, validated training config of a ConfigDict; raises ``ConfigError`` listing every problem.

    check_paths: also check that teacher/student/data paths exist, that the two models agree (vocabulary) and
      that the lengths fit the models' positions (off for unit tests of ranges).
    device_count: the devices of the run (jax.device_count()): the mesh must divide it and the batch the mesh.
    process_count: the processes of the run: each loads its share of every step's prompts.
    """
    problems = _Problems()
    typed = _build(Config, config, "", problems)
    sizes = _cross_checks(typed, problems, device_count)
    with _rule():
        if typed.data.prompts_per_step % process_count:
            problems.fail("data.prompts_per_step", typed.data.prompts_per_step,
                          f"must be divisible by the number of processes ({process_count})")
    if check_paths:
        with _rule():
            _check_paths(typed, problems, expert=(sizes or {}).get("expert", typed.mesh.expert))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return typed


def _cross_checks(c: Config, problems: _Problems, device_count: int | None) -> dict | None:
    """The rules that tie fields together; returns the mesh axes' sizes when the device count is known."""
    with _rule():
        if not c.workdir.strip():
            problems.fail("workdir", c.workdir, "must be a non-empty path (pass --config.workdir=DIR)")
    with _rule():
        if c.method in REWEIGHTING_METHODS and c.rollout.num_rollouts < 2:
            problems.fail("rollout.num_rollouts", c.rollout.num_rollouts,
                          f"must be >= 2 with method={c.method!r}: rollout weights are a softmax over the rollouts "
                          "of a prompt (Eq. 3-4); use method='opd' or 'group_only' for one rollout per prompt")
    d = c.data
    with _rule():
        if d.min_pixels > d.max_pixels:
            problems.fail("data.min_pixels", d.min_pixels, f"must be <= config.data.max_pixels = {d.max_pixels}")
    with _rule():
        if any(b % 4 for b in d.prompt_patch_buckets):
            problems.fail("data.prompt_patch_buckets", d.prompt_patch_buckets,
                          "must be multiples of 4 (spatial merge 2 x 2)")
    with _rule():
        if "synthetic" in (d.source, d.val_source):
            for name in ("synthetic_train_size", "synthetic_fine_fraction", "image_size"):
                if getattr(d, name) is None:
                    problems.append(f"config.data.{name} is missing (the synthetic task reads it; start from {DEMO})")
    with _rule():
        if d.synthetic_scaffold_tokens % synthetic.SCAFFOLD_UNIT:
            problems.fail("data.synthetic_scaffold_tokens", d.synthetic_scaffold_tokens,
                          f"must be a multiple of {synthetic.SCAFFOLD_UNIT} (one filler sentence per unit)")
    with _rule():
        if c.teacher.sft is not None and c.teacher.sft.vision_init != "random":
            problems.fail("teacher.sft.vision_init", c.teacher.sft.vision_init, "must be 'random' (the teacher has "
                          "no teacher to copy its vision tower from)")
    with _rule():
        if c.train.num_steps == 0:
            problems.fail("train.num_steps", 0, "must be >= 1, or -1 to derive it from data.num_epochs")
    with _rule():
        micro, k, prompts = c.train.micro_batch_rollouts, c.rollout.num_rollouts, d.prompts_per_step
        if micro and (micro % k or (prompts * k) % micro):
            problems.fail("train.micro_batch_rollouts", micro,
                          f"must be 0 or a multiple of rollout.num_rollouts = {k} (whole prompts) that divides the "
                          f"step's {prompts} x {k} = {prompts * k} rollouts")
    _check_roles(c, problems)
    with _rule():
        return _check_mesh(c, problems, device_count)
    return None


def _check_mesh(c: Config, problems: _Problems, device_count: int | None) -> dict | None:
    shape = dict(zip(MESH_AXES, c.mesh.shape()))
    for axis, size in shape.items():
        if size == 0:
            problems.fail(f"mesh.{axis}", 0, "must be >= 1 or -1")
    if sum(1 for size in shape.values() if size == -1) > 1:
        problems.append(f"config.mesh: at most one of {'/'.join(MESH_AXES)} may be -1")
        return None
    if device_count is None or any(size == 0 for size in shape.values()):
        return None
    fixed = math.prod(size for size in shape.values() if size != -1)
    if device_count % fixed:
        problems.append(f"config.mesh = {shape}: the fixed axes need a multiple of {fixed} devices; this run has "
                        f"{device_count}")
        return None
    sizes = {axis: (device_count // fixed if size == -1 else size) for axis, size in shape.items()}
    if math.prod(sizes.values()) != device_count:
        problems.append(f"config.mesh = {shape}: uses {math.prod(sizes.values())} of the run's {device_count} "
                        "devices (set one axis to -1 to take the rest)")
    batch_axes = sizes["data"] * sizes["fsdp"] * sizes["expert"]  # the logical 'batch' axis (sharding rules)
    with _rule():
        rows = c.data.prompts_per_step * c.rollout.num_rollouts
        if rows % batch_axes:
            problems.fail("data.prompts_per_step", c.data.prompts_per_step,
                          f"x rollout.num_rollouts = {rows} rollouts per step must be divisible by the batch axes of "
                          f"the mesh (data x fsdp x expert = {batch_axes}), or each device would hold every rollout")
    return sizes


def _check_roles(c: Config, problems: _Problems) -> None:
    with _rule():
        if c.teacher.init == "random":
            problems.fail("teacher.init", "random", "must be 'hf' or 'sft' (a random teacher teaches nothing)")
    for role in ("teacher", "student"):
        node = getattr(c, role)
        with _rule():
            if node.init in ("random", "sft") and node.tiny is None:
                problems.append(f"config.{role}.tiny is missing ({role}.init={node.init!r} builds a tiny model; start "
                                f"from {DEMO})")
        with _rule():
            if node.init == "sft" and node.sft is None:
                problems.append(f"config.{role}.sft is missing ({role}.init='sft' warms a tiny model up; start from "
                                f"{DEMO})")
        with _rule():
            if node.init == "sft" and c.data.source != "synthetic":
                problems.fail("data.source", c.data.source, f"must be 'synthetic' when {role}.init='sft' (the demo "
                              "warm-up is defined on the synthetic task)")
    with _rule():
        if c.data.task_vocabulary:
            rules = (("teacher.init", c.teacher.init, ("sft",)), ("student.init", c.student.init, ("random", "sft")),
                     ("data.source", c.data.source, ("synthetic",)),
                     ("data.val_source", c.data.val_source, ("synthetic",)),
                     ("data.num_workers", c.data.num_workers, (0,)))
            for name, value, allowed in rules:
                with _rule():
                    if value not in allowed:
                        problems.fail(name, value, f"must be one of {allowed} with data.task_vocabulary=True (the "
                                      "tiny models built here get the synthetic task's compact vocabulary; grain "
                                      "workers would reload the full tokenizer)")


def _check_paths(c: Config, problems: _Problems, expert: int) -> None:
    """The files the run reads, and what the two models' configs must agree on."""
    texts = {}  # role -> text config (dict) of its model: from its checkpoint, or from the tiny spec
    for role, other in (("teacher", "teacher.init='sft', the demo teacher"),
                        ("student", "student.init='random' / 'sft'")):
        node = getattr(c, role)
        with _rule():
            if node.init == "hf":
                if not node.hf_path or not os.path.isfile(os.path.join(node.hf_path, "config.json")):
                    problems.fail(f"{role}.hf_path", node.hf_path, "must be a local Hugging Face Qwen3-VL directory "
                                  f"with config.json (or configs/demo.py's {other})")
                    continue
                texts[role] = _read_text_config(node.hf_path)
                _check_size(c, problems, role, node.hf_path)
                if role == "teacher" and expert > 1:
                    problem = expert_axis_problem(node.hf_path, expert)
                    if problem:
                        problems.fail("mesh.expert", c.mesh.expert, problem)
            elif isinstance(node.tiny, Qwen3VLConfig):
                texts[role] = dataclasses.asdict(node.tiny.text)
    if "teacher" in texts and "student" in texts:
        teacher_vocab, student_vocab = texts["teacher"].get("vocab_size"), texts["student"].get("vocab_size")
        if teacher_vocab != student_vocab:
            problems.append(f"student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab}: the "
                            "token KL (Eq. 1) compares distributions over one vocabulary; pick a student and teacher "
                            "of one family")
    with _rule():
        longest = max(c.data.prompt_buckets) + max(c.rollout.max_new_tokens, c.eval.max_new_tokens)
        for role, text in texts.items():
            positions = text.get("max_position_embeddings")
            if positions and longest > positions:
                problems.fail("rollout.max_new_tokens", c.rollout.max_new_tokens,
                              f"the longest prompt (data.prompt_buckets up to {max(c.data.prompt_buckets)}) plus "
                              f"max(rollout, eval).max_new_tokens = {longest} tokens exceeds the {role}'s "
                              f"{positions} positions (max_position_embeddings)")
    for split, source_field in (("train_path", "source"), ("val_path", "val_source")):
        with _rule():
            path, source = getattr(c.data, split), getattr(c.data, source_field)
            if source != "synthetic" and (not path or not os.path.exists(path)):
                problems.fail(f"data.{split}", path,
                              f"must be an existing file or directory for data.{source_field}={source!r}")
    with _rule():
        if c.tokenizer_path and not os.path.isdir(c.tokenizer_path):
            problems.fail("tokenizer_path", c.tokenizer_path,
                          "must be a local tokenizer directory, or '' for the offline Qwen tokenizer")


# ----------------------------------------------------------------------------- the evaluator's config
@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """An OpenAI-compatible LLM judge for the protocols that use one (off when url is '')."""

    url: str = _field("str", where=EVAL)
    model: str = _field("str", where=EVAL)
    api_key_env: str = _field("str", where=EVAL)
    timeout_s: float = _field("float", lo=0, lo_open=True, where=EVAL)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """A validated evaluation config (`load_evaluate`; configs/eval_default.py documents every field)."""

    model: str = _field("str", where=EVAL)
    export: str = _field("str", choices=("best", "final"), where=EVAL)
    tokenizer_path: str = _field("str", where=EVAL)
    dtype: str = _field("str", choices=DTYPES, where=EVAL)
    benchmarks_dir: str = _field("str", where=EVAL)
    benchmarks: tuple[str, ...] = _field("names", choices=tuple(benchmarks_lib.BENCHMARKS), where=EVAL)
    output_dir: str = _field("str", where=EVAL)
    num_samples: int = _field("int", lo=1, where=EVAL, why="the paper uses 8: avg@8")
    temperature: float = _field("float", lo=0, where=EVAL, why="0 = greedy")
    top_p: float = _field("float", lo=0, hi=1, lo_open=True, where=EVAL)
    top_k: int = _field("int", lo=0, where=EVAL, why="0 = off")
    max_new_tokens: int = _field("int", lo=1, where=EVAL)
    batch_size: int = _field("int", lo=1, where=EVAL, why="prompts per sampler call")
    min_prompt_bucket: int = _field("int", lo=1, where=EVAL, why="smallest padded prompt length")
    seed: int = _field("int", lo=0, hi=2**31 - 1, where=EVAL)
    prompt_suffix: str = _field("str", where=EVAL)
    min_pixels: int = _field("int", lo=1, where=EVAL)
    max_pixels: int = _field("int", lo=1, where=EVAL)
    image_path: str = _field("str", choices=IMAGE_PATHS, where=EVAL)
    max_prompt_tokens: int = _field("int", lo=1, where=EVAL)
    limit: int = _field("int", lo=0, where=EVAL, why="0 = every question")
    grading_timeout_s: float = _field("float", lo=0, lo_open=True, where=EVAL)
    scoring: str = _field("str", choices=benchmarks_lib.SCORING_MODES, where=EVAL)
    mmstar_average: str = _field("str", choices=benchmarks_lib.MMSTAR_AVERAGES, where=EVAL)
    judge: JudgeConfig = _sub(JudgeConfig, where=EVAL)
    mesh: MeshConfig = _sub(MeshConfig, where=EVAL)
    paths: dict | None = _field("paths", choices=tuple(benchmarks_lib.BENCHMARKS), where=EVAL, default=None)

    def replace(self, **changes) -> "EvaluateConfig":
        return dataclasses.replace(self, **changes)

    def benchmark_dir(self, name: str) -> str:
        """Where benchmark `name` is read from: config.paths.<name>, else <benchmarks_dir>/<name>."""
        return (self.paths or {}).get(name, "") or os.path.join(self.benchmarks_dir, name)


def load_evaluate(config: ml_collections.ConfigDict):
    """The typed, validated evaluation config (`EvaluateConfig`); raises ``ConfigError`` listing every problem."""
    problems = _Problems()
    typed = _build(EvaluateConfig, config, "", problems)
    with _rule():
        if typed.min_pixels > typed.max_pixels:
            problems.fail("min_pixels", typed.min_pixels, f"must be <= config.max_pixels = {typed.max_pixels}")
    with _rule():
        if not typed.benchmarks_dir and not any((typed.paths or {}).get(n) for n in typed.benchmarks):
            problems.fail("benchmarks_dir", typed.benchmarks_dir, "must name the directory holding the benchmark "
                          "folders (or set config.paths.<name>)")
    with _rule():
        if not typed.output_dir:
            problems.fail("output_dir", typed.output_dir, "must name the results directory")
    with _rule():
        if typed.judge.url and not typed.judge.url.startswith(("http://", "https://")):
            problems.fail("judge.url", typed.judge.url, "must start with http:// or https:// (an OpenAI-compatible "
                          "endpoint)")
    with _rule():
        if typed.judge.url and not typed.judge.model:
            problems.fail("judge.model", typed.judge.model, "must name the judge model")
    with _rule():
        for axis, size in zip(MESH_AXES, typed.mesh.shape()):
            if size == 0 or (size == -1 and axis != "data"):
                problems.fail(f"mesh.{axis}", size, "must be >= 1" + (" or -1 (all remaining local devices)"
                                                                      if axis == "data" else ""))
    if problems:
        raise ConfigError("invalid evaluation config:\n  " + "\n  ".join(problems))
    return typed


# ----------------------------------------------------------------------------- model sizes
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


def _read_text_config(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    return hf.get("text_config", hf)


def _check_size(c: Config, problems: _Problems, role: str, path: str) -> None:
    """The checkpoint's config.json against ``<role>.size`` (a paper variant names its teacher's size)."""
    size = getattr(c, role).size
    if not size:
        return
    found, expected = _text_signature(_read_text_config(path)), _size_signature(size)
    if found != expected:
        named = [name for name in MODEL_SIZES if _size_signature(name) == found]
        what = f"a Qwen3-VL-{named[0].upper()}" if named else "no Qwen3-VL size this project knows"
        problems.fail(f"{role}.hf_path", path,
                      f"its config.json is {what} (text {_describe(found)}) but config.{role}.size = {size!r} expects "
                      f"{_describe(expected)}: point {role}.hf_path at the Qwen3-VL-{size.upper()} checkpoint"
                      + (f" or pick the variant {role}={named[0]}" if named and role == "teacher" else ""))


def expert_axis_problem(path: str, expert: int) -> str | None:
    """Why an 'expert' mesh axis of size `expert` cannot split the experts of the MoE checkpoint at `path` (None
    when it can, or when the checkpoint is dense: there the axis is one more FSDP axis)."""
    experts = _text_signature(_read_text_config(path)).get("num_experts")
    if experts and experts % expert:
        return (f"an expert axis of {expert} devices must divide the teacher's {experts} experts "
                f"({path}/config.json); pick a divisor of {experts}, or 1")
    return None


def hf_vocab_size(path: str) -> int:
    """``text_config.vocab_size`` from a Hugging Face Qwen3-VL ``config.json``."""
    text = _read_text_config(path)
    if "vocab_size" not in text:
        raise ConfigError(f"{os.path.join(path, 'config.json')} has no text_config.vocab_size (is it a Qwen3-VL "
                          "checkpoint?)")
    return int(text["vocab_size"])


# ----------------------------------------------------------------------------- the command line
def command_line(argv, *, usage: str, switches: tuple[str, ...] = ()):
    """(ConfigDict, switches, problems) of an entry point's command line:
    ``--config FILE[:ARG] [--config.a.b=VALUE ...] [--switch ...]``.

    The config file's ``get_config(ARG)`` gives the defaults; each override must name an existing field and
    parse as that field's type (bool true/false/1/0, int, float, str, tuples as Python literals or
    comma-separated). Every problem is collected (unknown fields, values that do not parse, unknown flags), so
    that the entry point can report them together with the config's own problems (`load`). `--help` prints
    `usage`.
    """
    args, overrides, flags, problems, config_arg = list(argv), [], {name: False for name in switches}, [], None
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help", "--helpfull"):
            raise SystemExit(f"usage: {usage.strip()}")
        name, eq, value = arg.partition("=")
        if name == "--config" or name.startswith("--config."):
            if not eq:
                if not args:
                    problems.append(f"{name}: needs a value")
                    continue
                value = args.pop(0)
            if name == "--config":
                config_arg = value
            else:
                overrides.append((name[len("--config."):], value))
        elif name[2:] in switches:
            flags[name[2:]] = value.lower() not in ("false", "0") if eq else True
        elif name.startswith("--no") and name[4:] in switches:
            flags[name[4:]] = False
        else:
            problems.append(f"{arg}: unknown flag ({usage.splitlines()[0] if usage else ''})")
    if config_arg is None:
        raise ConfigError(f"--config is required\n{usage}")
    path, _, variant = config_arg.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {config_arg}: no such config file {path!r}")
    config = load_sibling(path, os.path.splitext(os.path.basename(path))[0]).get_config(variant or None)
    for field, text in overrides:
        problem = _override(config, field, text)
        if problem:
            problems.append(f"--config.{field}={text}: {problem}")
    return config, flags, problems


def _override(config, field: str, text: str) -> str | None:
    """Sets one overridden field, parsed as the type of its current value; the problem, or None."""
    import ast
    import difflib

    *parents, leaf = field.split(".")
    node = config
    for depth, part in enumerate(parents + [leaf]):
        keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            where = ".".join(parents[:depth]) or "<root>"
            return (f"unknown field (config.{where} has no {part!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                    + ")")
        if depth < len(parents):
            node = node[part]
    current = node[leaf]
    try:
        if isinstance(current, ml_collections.ConfigDict):
            return "is a group of fields: override its fields one by one"
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                return "expected true or false"
            value = text.lower() in ("true", "1")
        elif isinstance(current, int):
            value = int(text)
        elif isinstance(current, float):
            value = float(text)
        elif isinstance(current, (tuple, list)):
            value = ast.literal_eval(text) if text.strip()[:1] in "([" else tuple(
                ast.literal_eval(item) if item.strip()[:1].isdigit() or item.strip()[:1] == "-" else item.strip()
                for item in text.split(",") if item.strip())
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        elif isinstance(current, str) or current is None:
            value = text
        else:
            return f"cannot override a {type(current).__name__} field from the command line"
    except (ValueError, SyntaxError):
        kind = {"int": "an integer", "float": "a number", "tuple": "a tuple", "list": "a list"}
        return f"expected {kind.get(type(current).__name__, type(current).__name__)} (the field's type), got {text!r}"
    with node.ignore_type() if isinstance(node, ml_collections.ConfigDict) else contextlib.nullcontext():
        node[leaf] = value
    return None


def load_command_line(argv, *, usage: str, switches: tuple[str, ...] = (), loader=None, **load_kwargs):
    """(typed config, switches) of a command line: `command_line`, then `loader` (default `load`); every problem
    of both in one ConfigError."""
    config, flags, problems = command_line(argv, usage=usage, switches=switches)
    try:
        typed = (loader or load)(config, **load_kwargs)
    except ConfigError as err:
        problems += [line.strip() for line in str(err).splitlines()[1:]]
        typed = None
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return typed, flags


# ----------------------------------------------------------------------------- helpers of the config files
def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a big_vision style config argument ``'method=opd,teacher=8b'``.

    Every key must appear in ``defaults``; each value is converted to the type of its default (bool accepts
    true/false/1/0).
    """
    out = dict(defaults)
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} in {arg!r} is not key=value; known keys: {sorted(defaults)}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ConfigError(f"config argument key {key!r} in {arg!r} is unknown; known keys: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {key}={value!r}: expected true/false")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, (int, float)):
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ConfigError(f"config argument {key}={value!r}: expected a {type(default).__name__}") from None
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def load_sibling(config_file: str, name: str):
    """Imports the config module ``name`` that sits beside ``config_file`` (e.g. ``configs/base.py``): config files
    are loaded by path (``--config configs/x.py``), so they cannot rely on ``configs`` being importable."""
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
    """A tiny Qwen3-VL shape for random-init / demo models (`model_config_from_spec(spec)`).

    The real vocabulary and special ids (the offline Qwen tokenizer), tied embeddings (halves the 151,936-row
    tables), an MRoPE section summing to head_dim / 2, and deepstack after every vision block but the last.
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
        # Tiny demo models use the real tokenizer, so they keep its special ids.
        "image_token_id": tokenizer_lib.IMAGE_PAD_ID, "video_token_id": tokenizer_lib.VIDEO_PAD_ID,
        "vision_start_token_id": tokenizer_lib.VISION_START_ID, "vision_end_token_id": tokenizer_lib.VISION_END_ID,
    })


def model_config_from_spec(spec) -> Qwen3VLConfig:
    """``Qwen3VLConfig.tiny(**spec)`` of a `tiny_spec` (a ConfigDict or a dict)."""
    kwargs = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
    for part in ("text", "vision"):
        kwargs[part] = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(kwargs[part]).items()}
    return Qwen3VLConfig.tiny(**kwargs)
