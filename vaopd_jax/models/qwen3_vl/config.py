"""Qwen3-VL configuration: frozen (hashable) dataclasses, presets, and the Hugging Face config.json bridge.

`Qwen3VLConfig.from_hf` reads a transformers `config.json` (path to the file, its directory, or the
dict); it accepts both the legacy `rope_scaling` and the newer `rope_parameters` forms of the text rope.
`to_hf_dict()` writes the dict that transformers' `Qwen3VLConfig(**d)` / `from_pretrained` accepts.

Mixture-of-experts models (`qwen3_vl_moe`, transformers' `Qwen3VLMoeForConditionalGeneration`: Qwen3-VL-30B-A3B,
235B-A22B) are the same config with `text.num_experts > 0`; `from_hf` reads both model types and `to_hf_dict`
writes the one the config describes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
SUPPORTED_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
# The runtime options' choices, one list each for the model, the train step and the config validators.
REMAT_POLICIES = ("none", "block")
ATTENTION_IMPLS = ("xla", "chunked", "cudnn")  # attention.py re-exports these (routing in attention.attend)
DTYPES = ("float32", "bfloat16")  # parameter / compute dtypes the trainer and the evaluator load models in
MOE_IMPLS = ("auto", "tiled", "ragged_dot")  # grouped.py re-exports these


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (ViT + patch mergers) of Qwen3-VL."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row: C * T_patch * P * P (1536 for Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 text decoder: dense (num_experts == 0) or mixture-of-experts.

    MoE fields (transformers' Qwen3VLMoeTextConfig): layer i has a routed-experts MLP when num_experts > 0,
    i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; other layers keep the dense SwiGLU MLP
    of width intermediate_size. A sparse layer routes each token to its num_experts_per_tok experts (SwiGLU of
    width moe_intermediate_size) by the softmax of the router logits, the top-k probabilities renormalised to
    sum to 1 when norm_topk_prob (transformers' Qwen3VLMoe always renormalises; Qwen3-MoE makes it optional).
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per decoder layer: True where the MLP is the routed-experts block (transformers' rule)."""
        return tuple(self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """Whole-model config. Frozen and hashable, so usable as a `jax.jit` static argument.

    `remat` is a runtime option (not part of the HF config): 'none' or 'block' (rematerialize each
    decoder / vision block in the backward pass).
    `attention_impl` (runtime) routes the full-sequence attention (forward, train step; not KV-cache decode):
    'xla' (dense (B, 1, T, T) mask + jax.nn.dot_product_attention: materializes T x T scores), 'chunked'
    (attention.chunked_attention: exact, `attention_chunk_size` queries at a time, any backend) or 'cudnn'
    (jax.nn.dot_product_attention(implementation='cudnn'), NVIDIA GPUs).
    `moe_chunk_size` (runtime, MoE models): tokens routed per grouped matmul; the routed rows of a layer are
    processed chunk by chunk, so the sorted (tokens x top-k) buffers stay bounded whatever the batch (moe.py).
    `moe_impl` (runtime): the grouped expert matmuls (grouped.py): 'auto' (TPU: 'ragged_dot', else 'tiled'),
    'tiled' (a loop over `moe_tile_size`-row tiles of one expert each, any backend) or 'ragged_dot'
    (jax.lax.ragged_dot: native on TPU; XLA's GPU and CPU backends expand it densely over all experts).
    """

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    remat: str = "none"
    attention_impl: str = "xla"
    attention_chunk_size: int = 512
    moe_chunk_size: int = 4096
    moe_impl: str = "auto"
    moe_tile_size: int = 512

    def __post_init__(self):
        validate(self)

    def replace(self, **changes) -> "Qwen3VLConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def qwen3_vl_2b(cls, **overrides) -> "Qwen3VLConfig":
        return _preset(2048, 6144, 28, 16, True, 24, 1024, 4096, (5, 11, 17), overrides)

    @classmethod
    def qwen3_vl_4b(cls, **overrides) -> "Qwen3VLConfig":
        return _preset(2560, 9728, 36, 32, True, 24, 1024, 4096, (5, 11, 17), overrides)

    @classmethod
    def qwen3_vl_8b(cls, **overrides) -> "Qwen3VLConfig":
        return _preset(4096, 12288, 36, 32, False, 27, 1152, 4304, (8, 16, 24), overrides)

    @classmethod
    def qwen3_vl_32b(cls, **overrides) -> "Qwen3VLConfig":
        return _preset(5120, 25600, 64, 64, False, 27, 1152, 4304, (8, 16, 24), overrides)

    @classmethod
    def qwen3_vl_30b_a3b(cls, **overrides) -> "Qwen3VLConfig":
        """Qwen3-VL-30B-A3B: 48 layers, width 2048, 32 q / 4 KV heads, 128 experts (MLP 768), top-8."""
        return _moe_preset(2048, 6144, 48, 32, 768, overrides)

    @classmethod
    def qwen3_vl_235b_a22b(cls, **overrides) -> "Qwen3VLConfig":
        """Qwen3-VL-235B-A22B: 94 layers, width 4096, 64 q / 4 KV heads, 128 experts (MLP 1536), top-8."""
        return _moe_preset(4096, 12288, 94, 64, 1536, overrides)

    @classmethod
    def tiny(cls, **overrides) -> "Qwen3VLConfig":
        """A CPU-test-sized config (a few hundred K params) with every feature switched on.

        overrides: top-level fields (e.g. tie_word_embeddings=True) or `text=dict(...)`,
        `vision=dict(...)` partial overrides of the sub-configs.
        """
        text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                    mrope_section=(4, 2, 2), max_position_embeddings=4096)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=(0, 2))
        top = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502,
                   vision_end_token_id=503, tie_word_embeddings=False)
        text.update(overrides.pop("text", {}) or {})
        vision.update(overrides.pop("vision", {}) or {})
        if "out_hidden_size" not in vision or vision["out_hidden_size"] != text["hidden_size"]:
            vision["out_hidden_size"] = text["hidden_size"]
        top.update(overrides)
        return cls(text=TextConfig(**_tuples(text)), vision=VisionConfig(**_tuples(vision)), **top)

    # ------------------------------------------------------------------ HF bridge
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "Qwen3VLConfig":
        """Reads a transformers Qwen3-VL `config.json` (file, directory holding it, or dict)."""
        if isinstance(path_or_dict, dict):
            d = path_or_dict
            where = "<dict>"
        else:
            where = os.fspath(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            if not os.path.exists(where):
                raise FileNotFoundError(f"Qwen3-VL config not found: {where} (expected a transformers config.json)")
            with open(where, encoding="utf-8") as f:
                d = json.load(f)
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where}: unsupported model_type {model_type!r}; this port supports {SUPPORTED_MODEL_TYPES} "
                "(dense Qwen3-VL and its mixture-of-experts variant)")
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad:
            raise ValueError(f"{where}: unsupported architectures {bad}; supported: {SUPPORTED_ARCHITECTURES}")
        moe = model_type == "qwen3_vl_moe"
        t = dict(d.get("text_config") or {})
        v = dict(d.get("vision_config") or {})
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"{where}: text rope_type {rope_type!r} is not supported (only 'default' MRoPE)")
        if rope and not rope.get("mrope_interleaved", True):
            raise ValueError(f"{where}: mrope_interleaved=False (Qwen2.5-VL style chunked MRoPE) is not supported")
        mrope_section = tuple(rope.get("mrope_section", (24, 20, 20)))
        text = TextConfig(
            vocab_size=t.get("vocab_size", 151936),
            hidden_size=t["hidden_size"] if "hidden_size" in t else 4096,
            intermediate_size=t.get("intermediate_size", 22016),
            num_hidden_layers=t.get("num_hidden_layers", 32),
            num_attention_heads=t.get("num_attention_heads", 32),
            num_key_value_heads=t.get("num_key_value_heads") or t.get("num_attention_heads", 32),
            head_dim=t.get("head_dim", 128),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=mrope_section,
            max_position_embeddings=t.get("max_position_embeddings", 128000),
            hidden_act=t.get("hidden_act", "silu"),
            attention_bias=bool(t.get("attention_bias", False)),
            **(_moe_fields(t, where) if moe else {}),
        )
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=v.get("depth", 27),
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_heads=v.get("num_heads", 16),
            in_channels=v.get("in_channels", 3),
            patch_size=v.get("patch_size", 16),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            out_hidden_size=v.get("out_hidden_size", 3584),
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        # Tying: the top-level flag decides (transformers 5.x); older files put it in text_config.
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        top = dict(
            image_token_id=d.get("image_token_id", cls.image_token_id),
            video_token_id=d.get("video_token_id", cls.video_token_id),
            vision_start_token_id=d.get("vision_start_token_id", cls.vision_start_token_id),
            vision_end_token_id=d.get("vision_end_token_id", cls.vision_end_token_id),
            tie_word_embeddings=bool(tie),
        )
        top.update(overrides)
        return cls(text=text, vision=vision, **top)

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The transformers `config.json` dict (loadable by `Qwen3VLForConditionalGeneration.from_pretrained`)."""
        t, v = self.text, self.vision
        moe = t.is_moe
        text_moe = {}
        if moe:
            text_moe = {"num_experts": t.num_experts, "num_experts_per_tok": t.num_experts_per_tok,
                        "moe_intermediate_size": t.moe_intermediate_size, "norm_topk_prob": t.norm_topk_prob,
                        "decoder_sparse_step": t.decoder_sparse_step, "mlp_only_layers": list(t.mlp_only_layers)}
        return {
            "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
            "dtype": dtype,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps,
                "attention_bias": t.attention_bias,
                "attention_dropout": 0.0,
                "dtype": dtype,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                    "mrope_interleaved": True,
                },
                **text_moe,
            },
            "vision_config": {
                "model_type": "qwen3_vl_moe_vision" if moe else "qwen3_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "hidden_act": v.hidden_act,
                "dtype": dtype,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


def _tuples(d: dict) -> dict:
    return {k: tuple(x) if isinstance(x, list) else x for k, x in d.items()}


def _moe_fields(t: dict, where: str) -> dict:
    """The MoE fields of a qwen3_vl_moe text_config (transformers' defaults where a field is absent)."""
    experts = t.get("num_experts", t.get("num_local_experts"))
    if experts is None:
        raise ValueError(f"{where}: text_config.num_experts is missing (a qwen3_vl_moe config needs it)")
    return dict(num_experts=int(experts), num_experts_per_tok=int(t.get("num_experts_per_tok", 4)),
                moe_intermediate_size=int(t.get("moe_intermediate_size", 1408)),
                # transformers' Qwen3VLMoe router always renormalises the top-k weights: absent means True.
                norm_topk_prob=bool(t.get("norm_topk_prob", True)),
                decoder_sparse_step=int(t.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in (t.get("mlp_only_layers") or ())))


def _moe_preset(hidden, mlp, layers, heads, moe_mlp, overrides) -> Qwen3VLConfig:
    """The released Qwen3-VL MoE shapes: 4 KV heads, 128 experts, top-8, renormalised, every layer sparse; the
    vision tower of the 8B/32B models with out_hidden_size = hidden."""
    text = TextConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=moe_mlp, norm_topk_prob=True)
    vision = VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=hidden,
                          deepstack_visual_indexes=(8, 16, 24))
    text = dataclasses.replace(text, **_tuples(overrides.pop("text", {}) or {}))
    vision = dataclasses.replace(vision, **_tuples(overrides.pop("vision", {}) or {}))
    return Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=False, **overrides)


def _preset(hidden, mlp, layers, heads, tie, vdepth, vhidden, vmlp, deepstack, overrides) -> Qwen3VLConfig:
    text = TextConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=8, head_dim=128)
    vision = VisionConfig(depth=vdepth, hidden_size=vhidden, intermediate_size=vmlp, num_heads=16,
                          out_hidden_size=hidden, deepstack_visual_indexes=deepstack)
    text = dataclasses.replace(text, **_tuples(overrides.pop("text", {}) or {}))
    vision = dataclasses.replace(vision, **_tuples(overrides.pop("vision", {}) or {}))
    return Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=tie, **overrides)


def validate(cfg: Qwen3VLConfig) -> None:
    """Raises ValueError naming the field, the value and the allowed range."""
    t, v = cfg.text, cfg.vision
    if t.head_dim % 2:
        raise ValueError(f"text.head_dim must be even, got {t.head_dim}")
    if len(t.mrope_section) != 3 or sum(t.mrope_section) != t.head_dim // 2:
        raise ValueError(f"text.mrope_section must be 3 ints summing to head_dim/2={t.head_dim // 2}, "
                         f"got {t.mrope_section}")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ValueError(f"text.num_attention_heads={t.num_attention_heads} must be a multiple of "
                         f"num_key_value_heads={t.num_key_value_heads}")
    if t.hidden_act != "silu":
        raise ValueError(f"text.hidden_act must be 'silu', got {t.hidden_act!r}")
    if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
        raise ValueError(f"vision.hidden_size/num_heads must be a multiple of 4 (2D rope), "
                         f"got {v.hidden_size}/{v.num_heads}")
    if v.num_grid_per_side**2 != v.num_position_embeddings:
        raise ValueError(f"vision.num_position_embeddings must be a perfect square, got {v.num_position_embeddings}")
    if v.out_hidden_size != t.hidden_size:
        raise ValueError(f"vision.out_hidden_size={v.out_hidden_size} must equal text.hidden_size={t.hidden_size}")
    for i in v.deepstack_visual_indexes:
        if not 0 <= i < v.depth:
            raise ValueError(f"vision.deepstack_visual_indexes entries must be in [0, depth={v.depth}), got {i}")
    if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
        raise ValueError(f"vision.deepstack_visual_indexes must be strictly increasing, got "
                         f"{v.deepstack_visual_indexes}")
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
        raise ValueError(f"{len(v.deepstack_visual_indexes)} deepstack levels need at least that many text "
                         f"layers, got num_hidden_layers={t.num_hidden_layers}")
    if v.hidden_act not in ("gelu_pytorch_tanh", "gelu", "gelu_new"):
        raise ValueError(f"vision.hidden_act must be one of gelu_pytorch_tanh/gelu/gelu_new, got {v.hidden_act!r}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        val = getattr(cfg, name)
        if not 0 <= val < t.vocab_size:
            raise ValueError(f"{name}={val} must be in [0, text.vocab_size={t.vocab_size})")
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {cfg.remat!r}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {cfg.attention_impl!r}")
    if cfg.attention_chunk_size < 1:
        raise ValueError(f"attention_chunk_size must be >= 1, got {cfg.attention_chunk_size}")
    if cfg.moe_chunk_size < 1:
        raise ValueError(f"moe_chunk_size must be >= 1, got {cfg.moe_chunk_size}")
    if cfg.moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {cfg.moe_impl!r}")
    if cfg.moe_tile_size < 1:
        raise ValueError(f"moe_tile_size must be >= 1, got {cfg.moe_tile_size}")
    if t.num_experts < 0:
        raise ValueError(f"text.num_experts must be >= 0 (0 = dense), got {t.num_experts}")
    if t.is_moe:
        if not 1 <= t.num_experts_per_tok <= t.num_experts:
            raise ValueError(f"text.num_experts_per_tok must be in [1, num_experts={t.num_experts}], "
                             f"got {t.num_experts_per_tok}")
        if t.moe_intermediate_size < 1:
            raise ValueError(f"text.moe_intermediate_size must be >= 1, got {t.moe_intermediate_size}")
        if t.decoder_sparse_step < 1:
            raise ValueError(f"text.decoder_sparse_step must be >= 1, got {t.decoder_sparse_step}")
        bad = [i for i in t.mlp_only_layers if not 0 <= i < t.num_hidden_layers]
        if bad:
            raise ValueError(f"text.mlp_only_layers entries must be in [0, num_hidden_layers={t.num_hidden_layers}), "
                             f"got {bad}")
