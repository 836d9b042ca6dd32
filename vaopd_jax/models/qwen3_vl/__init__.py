"""Qwen3-VL in Flax NNX: config, model, rope/position ids, checkpoint conversion, sharding rules.

    from vaopd_jax.models import qwen3_vl
    model = qwen3_vl.load_hf_checkpoint(path, dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)      # (B, T, V) float32
See model.py for the forward / KV-cache API and rope.py for the host-side position ids and vision inputs.
"""

from .config import Qwen3VLConfig, TextConfig, VisionConfig
from .convert import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from .model import Qwen3VL
from .rope import VisionInputs, get_rope_index, num_patches, prepare_vision_inputs
from .sharding import DEFAULT_RULES, logical_to_spec, param_shardings, shard_model
from .text import KVCache

__all__ = [
    "Qwen3VLConfig", "TextConfig", "VisionConfig", "Qwen3VL", "VisionInputs", "KVCache", "CheckpointError",
    "get_rope_index", "prepare_vision_inputs", "num_patches", "load_hf_checkpoint", "save_hf_checkpoint",
    "DEFAULT_RULES", "logical_to_spec", "param_shardings", "shard_model",
]
