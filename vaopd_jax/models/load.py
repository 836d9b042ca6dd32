"""The trainer's models: Hugging Face checkpoints or tiny random ones, with the run's runtime options.

    model = load_model(config, "/ckpt/Qwen3-VL-2B-Instruct", mesh, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    model = tiny_model(config, config.student.tiny, dtype=jnp.bfloat16, seed=0)    # the demo / test students
    count_params(model)

`config` is a training config (configs/base.py): its `model.attention_impl` / `model.attention_chunk_size` are
runtime options, chosen by the run whatever the checkpoint says.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vaopd_jax.models import qwen3_vl


def runtime_options(config) -> dict:
    """Model-config fields that the run chooses, not the checkpoint (attention kernel and its chunking)."""
    return {"attention_impl": config.model.attention_impl, "attention_chunk_size": config.model.attention_chunk_size}


def load_model(config, path: str, mesh, *, dtype, compute_dtype=None) -> qwen3_vl.Qwen3VL:
    """A Hugging Face checkpoint with this run's runtime options (``config.model.attention_impl`` ...)."""
    cfg = qwen3_vl.Qwen3VLConfig.from_hf(path).replace(**runtime_options(config))
    return qwen3_vl.load_hf_checkpoint(path, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype, config=cfg)


def config_from_spec(spec) -> qwen3_vl.Qwen3VLConfig:
    """``Qwen3VLConfig.tiny(**spec)`` of a `config.tiny_spec` node (e.g. ``config.student.tiny``)."""
    kwargs = spec.to_dict()
    for part in ("text", "vision"):
        kwargs[part] = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs[part].items()}
    return qwen3_vl.Qwen3VLConfig.tiny(**kwargs)


def tiny_model(config, spec, *, compute_dtype=None, seed: int = 0, tokenizer=None) -> qwen3_vl.Qwen3VL:
    """A randomly initialised tiny model (float32 params) of a `tiny_spec` node, with the run's options.

    tokenizer: a `data.tokenizer.TaskVocabTokenizer` gives the model its compact vocabulary (its size and its
    special ids); any other tokenizer (or None) keeps the spec's (the real Qwen vocabulary)."""
    cfg = config_from_spec(spec).replace(**runtime_options(config))
    if tokenizer is not None and hasattr(tokenizer, "base_ids"):
        ids = {name: int(tokenizer.convert_tokens_to_ids(token)) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tokenizer)), **ids)
    return qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, compute_dtype=compute_dtype, rngs=nnx.Rngs(seed))


def count_params(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
