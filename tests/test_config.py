"""Config files load, variants apply, and bad values fail with the field, value and range."""

import json
import os

import pytest

from vaopd_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIGS = ["base", "paper", "demo"]
PAPER_VARIANTS = [f"teacher={t},data={d}" for t in ("4b", "8b", "32b", "30b-a3b", "235b-a22b")
                  for d in ("geo3k", "virl39k")]


def module(name):
    return config_lib.load_sibling(os.path.join(REPO, "configs", "base.py"), name)


def load(name, arg=None):
    return module(name).get_config(arg)


def test_every_train_config_validates_and_documents_its_command():
    for name in TRAIN_CONFIGS:
        mod = module(name)
        assert mod.__doc__.strip().startswith(f"python -m vaopd_jax.train --config configs/{name}.py"), name
        cfg = mod.get_config(None)
        cfg.workdir = "/tmp/x"
        config_lib.load(cfg, check_paths=False)
    for variant in PAPER_VARIANTS:
        cfg = load("paper", variant)
        cfg.workdir = "/tmp/x"
        config_lib.load(cfg, check_paths=False)
        assert cfg.teacher.size == variant.split(",")[0].split("=")[1] and cfg.student.size == "2b"
        assert cfg.data.source == {"geo3k": "geometry3k", "virl39k": "virl39k"}[variant.split("data=")[1]]
        assert cfg.data.val_source == "geometry3k"
        # Dense teachers: FSDP over all devices; MoE teachers: experts (and FSDP of the dense parts) over them.
        moe = cfg.teacher.size in ("30b-a3b", "235b-a22b")
        assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor) == ((1, 1, -1, 1) if moe else
                                                                                   (1, -1, 1, 1))
        # The default hardware's (a100x8) micro-batch from configs/paper.py's SIZING (tests/test_paper_sizing.py).
        paper = module("paper")
        assert cfg.train.micro_batch_rollouts == paper.sizing("a100x8", cfg.teacher.size, 4096)[1]


def test_paper_variants_name_and_check_their_teacher(tmp_path):
    real = {"2b": (2048, 28, 6144), "4b": (2560, 36, 9728), "8b": (4096, 36, 12288), "32b": (5120, 64, 25600)}

    def hf_dir(name, size):
        hidden, layers, mlp = real[size]
        return _hf_dir(tmp_path, name, 151936, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp)

    student, teacher_4b = hf_dir("student", "2b"), hf_dir("teacher4b", "4b")
    for size in ("4b", "8b"):
        cfg = _with(load("paper", f"teacher={size},method=opd"), workdir=str(tmp_path), student__hf_path=student,
                    teacher__hf_path=teacher_4b, data__train_path=str(tmp_path), data__val_path=str(tmp_path))
        assert cfg.method == "opd"
        if size == "4b":
            config_lib.load(cfg)
            continue
        with pytest.raises(config_lib.ConfigError,
                           match=r"config.teacher.hf_path = '.*teacher4b': its config.json is a Qwen3-VL-4B .* but "
                                 r"config.teacher.size = '8b' expects hidden_size=4096.* or pick the variant teacher=4b"):
            config_lib.load(cfg)
    # The student is checked the same way (a 4B checkpoint given as the 2B student).
    cfg = _with(load("paper", "teacher=4b"), workdir=str(tmp_path), student__hf_path=teacher_4b,
                teacher__hf_path=teacher_4b, data__train_path=str(tmp_path), data__val_path=str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match=r"config.student.size = '2b'"):
        config_lib.load(cfg)
    with pytest.raises(config_lib.ConfigError, match=r"teacher='16b'; must be one of \('4b', '8b', '32b', '30b-a3b'"):
        load("paper", "teacher=16b")


# text_config size fields of the released Qwen3-VL-30B-A3B-Instruct config.json (Qwen/Qwen3-VL-30B-A3B-Instruct)
# and of Qwen3-VL-235B-A22B-Instruct.
REAL_MOE_TEXT = {
    "30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, intermediate_size=6144, num_experts=128,
                    num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[]),
    "235b-a22b": dict(hidden_size=4096, num_hidden_layers=94, intermediate_size=12288, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=1536, decoder_sparse_step=1, mlp_only_layers=[]),
}


def test_moe_teacher_variants_check_the_checkpoint_like_dense_sizes(tmp_path):
    student = _hf_dir(tmp_path, "student", 151936, hidden_size=2048, num_hidden_layers=28, intermediate_size=6144)
    moe_dirs = {size: _hf_dir(tmp_path, f"teacher_{size}", 151936, model_type="qwen3_vl_moe", **text)
                for size, text in REAL_MOE_TEXT.items()}
    dense_8b = _hf_dir(tmp_path, "teacher_8b", 151936, hidden_size=4096, num_hidden_layers=36, intermediate_size=12288)
    paths = dict(workdir=str(tmp_path), student__hf_path=student, data__train_path=str(tmp_path),
                 data__val_path=str(tmp_path))
    for size, path in moe_dirs.items():
        config_lib.load(_with(load("paper", f"teacher={size}"), teacher__hf_path=path, **paths))
    # The 30B-A3B checkpoint for the 235B-A22B variant, and for the 8B one; an 8B checkpoint for the 30B-A3B one.
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.teacher.hf_path = '.*teacher_30b-a3b': its config.json is a Qwen3-VL-30B-A3B "
                             r"\(text hidden_size=2048, num_hidden_layers=48, num_experts=128, "
                             r"moe_intermediate_size=768\) but config.teacher.size = '235b-a22b' expects "
                             r"hidden_size=4096, num_hidden_layers=94, num_experts=128, moe_intermediate_size=1536: "
                             r"point teacher.hf_path at the Qwen3-VL-235B-A22B checkpoint or pick the variant "
                             r"teacher=30b-a3b"):
        config_lib.load(_with(load("paper", "teacher=235b-a22b"), teacher__hf_path=moe_dirs["30b-a3b"], **paths))
    with pytest.raises(config_lib.ConfigError, match=r"is a Qwen3-VL-30B-A3B .* config.teacher.size = '8b'"):
        config_lib.load(_with(load("paper", "teacher=8b"), teacher__hf_path=moe_dirs["30b-a3b"], **paths))
    with pytest.raises(config_lib.ConfigError, match=r"is a Qwen3-VL-8B .* config.teacher.size = '30b-a3b' expects "
                                                     r"hidden_size=2048, num_hidden_layers=48, num_experts=128"):
        config_lib.load(_with(load("paper", "teacher=30b-a3b"), teacher__hf_path=dense_8b, **paths))
    # An expert axis that does not divide the 128 experts; a dense teacher ignores the axis's size.
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.expert = 3: an expert axis of 3 devices must "
                                                     r"divide the teacher's 128 experts"):
        config_lib.load(_with(load("paper", "teacher=30b-a3b"), teacher__hf_path=moe_dirs["30b-a3b"],
                                  mesh__expert=3, **paths))
    config_lib.load(_with(load("paper", "teacher=8b"), teacher__hf_path=dense_8b, mesh__expert=3,
                              mesh__fsdp=1, **paths))
    # The trainer's check once mesh.expert = -1 is resolved to the device count.
    assert config_lib.expert_axis_problem(moe_dirs["235b-a22b"], 32) is None
    assert "divide the teacher's 128 experts" in config_lib.expert_axis_problem(moe_dirs["30b-a3b"], 48)
    assert config_lib.expert_axis_problem(dense_8b, 48) is None


@pytest.mark.parametrize("method", config_lib.METHODS)
def test_method_variant(method):
    cfg = load("paper", f"method={method}")
    assert cfg.method == method
    cfg.va.p_v = 0.25
    cfg.workdir = "/tmp/x"
    objective = config_lib.load(cfg, check_paths=False).objective()
    assert (objective.method, objective.high_fraction, objective.high_weight, objective.tau) == (method, 0.25, 0.5, 1.0)
    reweight, group = objective.reweight, objective.group
    assert (reweight, group) == {"va_opd": (True, True), "opd": (False, False),
                                 "reweight_only": (True, False), "group_only": (False, True)}[method]


def test_paper_defaults():
    cfg = load("base")
    assert (cfg.va.p_v, cfg.va.lam, cfg.va.tau, cfg.va.eps, cfg.va.pixelation_ratio) == (0.2, 0.5, 1.0, 1e-6, 0.1)
    assert (cfg.data.prompts_per_step, cfg.rollout.num_rollouts, cfg.rollout.max_new_tokens) == (16, 4, 4096)
    assert (cfg.optim.lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.clip_norm) == (
        1e-6, 0.9, 0.95, 0.1, 1.0)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (0.7, 0.95, 0)
    assert (cfg.eval.every, cfg.eval.num_problems) == (50, 200)
    # the release: seed 42, avg@8 validation at temperature 1.0, top-p 1.0; the release's image path
    assert (cfg.seed, cfg.eval.num_samples, cfg.eval.temperature, cfg.eval.top_p) == (42, 8, 1.0, 1.0)
    assert cfg.data.image_path == "release" and cfg.train.num_steps == -1 and cfg.data.num_epochs == 5


def test_bad_variant_argument_names_the_known_keys():
    with pytest.raises(config_lib.ConfigError, match="unknown; known keys: \\['method'\\]"):
        load("base", "teacher=8b")
    with pytest.raises(config_lib.ConfigError, match="config.method = 'kd'"):
        config_lib.load(_with(load("base", "method=kd"), workdir="/tmp/x"), check_paths=False)


def _with(cfg, **fields):
    for dotted, value in fields.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    return cfg


@pytest.mark.parametrize("field,value,message", [
    ("va__p_v", 0.0, r"config.va.p_v = 0.0: must be in \(0, 1\]"),
    ("va__p_v", 1.5, r"config.va.p_v = 1.5: must be in \(0, 1\]"),
    ("va__lam", -0.1, r"config.va.lam = -0.1: must be in \[0, 1\]"),
    ("va__lam", 1.01, r"config.va.lam = 1.01: must be in \[0, 1\]"),
    ("va__eps", 0.0, r"config.va.eps = 0.0: must be in \(0, inf\) .*NaN weights when siblings have equal means"),
    ("data__image_path", "twice", r"config.data.image_path = 'twice': must be one of \('release', 'single_resize'\)"),
    ("rollout__num_rollouts", 1, r"config.rollout.num_rollouts = 1: must be >= 2 with method='va_opd'"),
    ("rollout__top_p", 0.0, r"config.rollout.top_p = 0.0: must be in \(0, 1\]"),
    ("optim__lr", -1e-6, r"config.optim.lr = -1e-06: must be in \(0, inf\)"),
    ("optim__b2", 1.0, r"config.optim.b2 = 1.0: must be in \[0, 1\)"),
    ("data__prompts_per_step", 2.5, r"config.data.prompts_per_step = 2.5: must be an integer"),
    ("data__min_pixels", 10**8, r"config.data.min_pixels = 100000000: must be <= config.data.max_pixels"),
    ("data__prompt_buckets", (512, 256), r"config.data.prompt_buckets = \(512, 256\): must be a non-empty increasing"),
    ("model__dtype", "float16", r"config.model.dtype = 'float16': must be one of \('float32', 'bfloat16'\)"),
    ("model__attention_impl", "flash", r"config.model.attention_impl = 'flash': must be one of \('xla', 'chunked'"),
    ("train__num_steps", 0, r"config.train.num_steps = 0: must be >= 1, or -1"),
    ("workdir", "", r"config.workdir = '': must be a non-empty path"),
    ("mesh__tensor", 0, r"config.mesh.tensor = 0: must be >= 1 or -1"),
    ("mesh__expert", 0, r"config.mesh.expert = 0: must be >= 1 or -1"),
    ("mesh__expert", -2, r"config.mesh.expert = -2: must be in \[-1, inf\) \(-1 takes the remaining devices; a MoE"),
    ("mesh__expert", 1.5, r"config.mesh.expert = 1.5: must be an integer"),
    ("mesh__expert", -1, r"config.mesh: at most one of data/fsdp/expert/tensor may be -1"),
    ("train__micro_batch_rollouts", -4, r"config.train.micro_batch_rollouts = -4: must be in \[0, inf\)"),
    ("train__micro_batch_rollouts", 6, r"config.train.micro_batch_rollouts = 6: must be 0 or a multiple of "
                                       r"rollout.num_rollouts = 4 \(whole prompts\)"),
    ("train__micro_batch_rollouts", 24, r"that divides the step's 16 x 4 = 64 rollouts"),
    ("train__watchdog__timeout_s", -1.0, r"config.train.watchdog.timeout_s = -1.0: must be in \[0, inf\)"),
    ("train__watchdog__action", "restart", r"config.train.watchdog.action = 'restart': must be one of \('report', "),
    ("train__compilation_cache_dir", 3, r"config.train.compilation_cache_dir = 3: must be a string: a directory, ''"),
])
def test_bad_field_fails_naming_field_value_and_range(field, value, message):
    cfg = _with(load("base"), workdir="/tmp/x")
    cfg = _with(cfg, **{field: value})
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(cfg, check_paths=False)


def test_demo_fields_live_in_the_demo_config():
    base, demo = load("base"), load("demo")
    for field in ("tiny", "sft"):
        assert field not in base.student and field in demo.student
    assert "sft" not in base.teacher and demo.teacher.init == "sft"
    assert "synthetic_train_size" not in base.data and "synthetic_train_size" in demo.data
    cfg = _with(load("base"), workdir="/tmp/x", student__init="random")
    with pytest.raises(config_lib.ConfigError, match=r"config.student.tiny is missing .* configs/demo.py"):
        config_lib.load(cfg, check_paths=False)
    cfg = _with(load("demo"), data__synthetic_fine_fraction=1.2)
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.data.synthetic_fine_fraction = 1.2: must be in \[0, 1\]"):
        config_lib.load(cfg, check_paths=False)


def test_demo_warm_up_images_must_be_a_known_view():
    cfg = _with(load("demo"), student__sft__images="blurred")
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.student.sft.images = 'blurred': must be one of \('original', 'pixelated', "
                             r"'pixelated_fine'\)"):
        config_lib.load(cfg, check_paths=False)


def test_k1_is_allowed_without_reweighting():
    cfg = _with(load("base", "method=group_only"), workdir="/tmp/x", rollout__num_rollouts=1)
    config_lib.load(cfg, check_paths=False)


def test_all_problems_reported_at_once():
    cfg = _with(load("base"), workdir="/tmp/x", va__p_v=2.0, va__lam=3.0)
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load(cfg, check_paths=False)
    assert "config.va.p_v = 2.0" in str(err.value) and "config.va.lam = 3.0" in str(err.value)


def _hf_dir(tmp_path, name, vocab, model_type="qwen3_vl", **text):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                  "text_config": {"vocab_size": vocab, **text}}))
    return str(path)


def test_missing_teacher_path(tmp_path):
    cfg = _with(load("base"), workdir=str(tmp_path), teacher__hf_path=str(tmp_path / "nope"),
                student__hf_path=_hf_dir(tmp_path, "student", 151936),
                data__train_path=str(tmp_path), data__val_path=str(tmp_path))
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.teacher.hf_path = '.*nope': must be a local Hugging Face"):
        config_lib.load(cfg)


def test_student_teacher_vocab_mismatch(tmp_path):
    cfg = _with(load("base"), workdir=str(tmp_path), teacher__hf_path=_hf_dir(tmp_path, "teacher", 151936),
                student__hf_path=_hf_dir(tmp_path, "student", 32000),
                data__train_path=str(tmp_path), data__val_path=str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match="student vocabulary size 32000 != teacher vocabulary size 151936"):
        config_lib.load(cfg)
    cfg.student.hf_path = _hf_dir(tmp_path, "student2", 151936)
    config_lib.load(cfg)


def test_missing_data_path(tmp_path):
    cfg = _with(load("base"), workdir=str(tmp_path), teacher__hf_path=_hf_dir(tmp_path, "teacher", 151936),
                student__hf_path=_hf_dir(tmp_path, "student", 151936), data__train_path="/no/such/geo3k",
                data__val_path=str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match="config.data.train_path = '/no/such/geo3k'"):
        config_lib.load(cfg)


def test_sweep_lists_methods_times_teachers():
    sweep = module("sweep_ablation").get_sweep(None)
    runs = {(r["method"], r["teacher"]) for r in sweep}
    assert runs == {(m, t) for m in config_lib.METHODS for t in ("4b", "8b", "32b")}
    assert len({r["name"] for r in sweep}) == len(sweep)
    for r in sweep:
        assert os.path.exists(os.path.join(REPO, r["config"].split(":")[0]))
    moe = module("sweep_ablation").get_sweep("teachers=30b-a3b,methods=va_opd")
    assert [(r["name"], r["config"]) for r in moe] == [
        ("geo3k_30b-a3b_to_2b_va_opd", "configs/paper.py:teacher=30b-a3b,data=geo3k,method=va_opd")]
    assert moe[0]["overrides"]["teacher.hf_path"].endswith("/Qwen3-VL-30B-A3B-Instruct")


def test_every_field_is_overridable_from_the_command_line():
    # ml_collections' config_flags overrides int/float/bool/str/tuple fields; a list field could not be set.
    def leaves(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for name in TRAIN_CONFIGS:
        for field, value in leaves(load(name)):
            assert type(value) in (int, float, bool, str, tuple), f"configs/{name}.py: {field} is {type(value)}"


def test_attention_choices_follow_the_model():
    from vaopd_jax.models.qwen3_vl import config as model_config

    assert config_lib.ATTENTION_IMPLS == model_config.ATTENTION_IMPLS


def test_remat_accepts_only_what_the_model_implements():
    from vaopd_jax.models.qwen3_vl import config as model_config

    assert config_lib.REMAT_POLICIES == model_config.REMAT_POLICIES
    cfg = _with(load("base"), workdir="/tmp/x", model__remat="full")
    with pytest.raises(config_lib.ConfigError, match=r"config.model.remat = 'full': must be one of \('none', 'block'\)"):
        config_lib.load(cfg, check_paths=False)
