"""The trainer's models: Hugging Face checkpoints or tiny random ones, with the run's runtime options.

    model = load_model(config.model, "/ckpt/Qwen3-VL-2B-Instruct", mesh, dtype=jnp.float32,
                       compute_dtype=jnp.bfloat16)
    model = tiny_model(config.model, config.student.tiny, compute_dtype=jnp.bfloat16, seed=0)   # demo / tests
    count_params(model)

`options` is the run's `config.ModelConfig`: its attention kernel and chunking are chosen by the run, whatever
the checkpoint says.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vaopd_jax.models import qwen3_vl


def load_model(options, path: str, mesh, *, dtype, compute_dtype=None) -> qwen3_vl.Qwen3VL:
    """A Hugging Face checkpoint with this run's runtime options (`ModelConfig.runtime_options`)."""
    cfg = qwen3_vl.Qwen3VLConfig.from_hf(path).replace(**options.runtime_options())
    return qwen3_vl.load_hf_checkpoint(path, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype, config=cfg)


def tiny_model(options, cfg: qwen3_vl.Qwen3VLConfig, *, compute_dtype=None, seed: int = 0,
               tokenizer=None) -> qwen3_vl.Qwen3VL:
    """A randomly initialised tiny model (float32 params) of a tiny shape (`config.RoleConfig.tiny`).

    tokenizer: a `data.tokenizer.TaskVocabTokenizer` gives the model its compact vocabulary (its size and its
    special ids); any other tokenizer (or None) keeps the shape's (the real Qwen vocabulary)."""
    cfg = cfg.replace(**options.runtime_options())
    if tokenizer is not None and hasattr(tokenizer, "base_ids"):
        ids = {name: int(tokenizer.convert_tokens_to_ids(token)) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer)), **ids)
    return qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, compute_dtype=compute_dtype, rngs=nnx.Rngs(seed))


def count_params(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
