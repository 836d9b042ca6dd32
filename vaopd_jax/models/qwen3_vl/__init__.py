"""Qwen3-VL in Flax NNX: config, model, rope/position ids, checkpoint conversion, sharding rules."""

from .config import Qwen3VLConfig, TextConfig, VisionConfig
from .model import Qwen3VL
from .rope import VisionInputs, get_rope_index, num_patches, prepare_vision_inputs
from .text import KVCache

__all__ = [
    "Qwen3VLConfig", "TextConfig", "VisionConfig", "Qwen3VL", "VisionInputs", "KVCache",
    "get_rope_index", "prepare_vision_inputs", "num_patches",
]
