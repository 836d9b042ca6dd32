"""Test helpers shared by the model, sampler and train-step parity tests (torch is imported lazily).

    cfg = tiny_config(tie_word_embeddings=True)    # tiny_moe_config(...): the mixture-of-experts variant
    hf = hf_reference_model(cfg, seed=0)          # transformers Qwen3VL(Moe)ForConditionalGeneration, fp32, eager
    model = model_from_hf(hf, cfg)                  # our Qwen3VL with the same weights
    cfg, hf, model = reference_pair(cfg)            # the two, built once per config and seed
    model = o1_model(cfg, seed=0)                   # random weights with O(1) activations (KL tests)
    ids, mask = with_generated(batch, generated)   # prompts + generated tokens, right-padded (decode tests)
    batch = make_batch(cfg, [[(1, 4, 6)], [(1, 8, 4), (1, 4, 4)]], text_lens=[5, 3], seed=0)
    hf_logits = hf_logits(hf, batch)               # numpy (B, T, V)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .config import Qwen3VLConfig
from .convert import model_from_tensors
from .model import Qwen3VL


def tiny_config(**overrides) -> Qwen3VLConfig:
    """The tiny test config (Qwen3VLConfig.tiny) with overrides (top-level fields, text=dict, vision=dict)."""
    return Qwen3VLConfig.tiny(**overrides)


def one_layer_config(hidden: int) -> Qwen3VLConfig:
    """The tiny config cut to one text layer and one vision block, width `hidden` (the train-step tests' teacher
    and student: the cheapest models that still have every input path)."""
    return Qwen3VLConfig.tiny(
        text=dict(hidden_size=hidden, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1),
        vision=dict(depth=1, deepstack_visual_indexes=(0,), hidden_size=16, intermediate_size=32, num_heads=1))


def tiny_moe_config(**overrides) -> Qwen3VLConfig:
    """The tiny config with a mixture-of-experts decoder: 6 experts of width 24, top-2, renormalised, every layer
    sparse. overrides as tiny_config; `text=dict(...)` entries replace these defaults."""
    text = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                intermediate_size=96)
    text.update(overrides.pop("text", {}) or {})
    return Qwen3VLConfig.tiny(text=text, **overrides)


def hf_reference_model(cfg: Qwen3VLConfig, seed: int = 0):
    """transformers' Qwen3VLForConditionalGeneration (Qwen3VLMoeForConditionalGeneration for a MoE config) for
    `cfg`, random init, fp32, eager attention, eval mode.

    transformers' Qwen3VLMoe router always renormalises the top-k weights; for norm_topk_prob=False each router is
    replaced by transformers' Qwen3-MoE router (Qwen3MoeTopKRouter, which honours the flag) with the same weight."""
    import torch
    import transformers

    torch.manual_seed(seed)
    moe = cfg.text.is_moe
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    model_cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    hf_cfg = config_cls(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    model = model_cls(hf_cfg).to(torch.float32).eval()
    # Re-initialize so activations and logits are O(1) (transformers' std 0.02 makes logits tiny and parity
    # tests insensitive) and norms/biases are not trivially 1/0, so every parameter is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1 or "embed_tokens" in name or "pos_embed" in name:
                p.copy_(torch.randn_like(p))
            elif ".mlp.experts." in name:  # fused (X, out, in) expert kernels
                p.copy_(torch.randn_like(p) / p.shape[-1]**0.5)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    if moe and not cfg.text.norm_topk_prob:
        _use_unnormalised_routers(model, cfg)
    return model


def _use_unnormalised_routers(model, cfg: Qwen3VLConfig):
    """Swaps every sparse layer's router for transformers' Qwen3MoeTopKRouter(norm_topk_prob=False), same weight."""
    import types

    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    t = cfg.text
    router_cfg = types.SimpleNamespace(num_experts_per_tok=t.num_experts_per_tok, num_experts=t.num_experts,
                                       norm_topk_prob=False, hidden_size=t.hidden_size)
    for layer in model.model.language_model.layers:
        old = getattr(layer.mlp, "gate", None)
        if isinstance(old, torch.nn.Module) and hasattr(old, "top_k"):
            new = Qwen3MoeTopKRouter(router_cfg)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            layer.mlp.gate = new.to(old.weight.dtype)


def model_from_hf(hf_model, cfg: Qwen3VLConfig | None = None, dtype=jnp.float32, **kwargs) -> Qwen3VL:
    """Our Qwen3VL holding the weights of a transformers model (via the checkpoint name mapping)."""
    cfg = cfg or Qwen3VLConfig.from_hf(hf_model.config.to_dict())
    state = {k: v.detach().cpu().float().numpy() for k, v in hf_model.state_dict().items()}
    return model_from_tensors(cfg, lambda key: _lookup(state, key), dtype=dtype, **kwargs)


_PAIRS: dict = {}


def reference_pair(cfg: Qwen3VLConfig, seed: int = 1):
    """(cfg, transformers model, our model with its weights), built once per (cfg, seed) in a process."""
    if (cfg, seed) not in _PAIRS:
        hf = hf_reference_model(cfg, seed=seed)
        _PAIRS[cfg, seed] = (cfg, hf, model_from_hf(hf, cfg))
    return _PAIRS[cfg, seed]


def o1_model(cfg: Qwen3VLConfig, seed: int) -> Qwen3VL:
    """A random model with O(1) activations: the default std-0.02 init gives near-uniform softmaxes and a tiny,
    insensitive KL. The weights are edited on the host (eager jax ops would compile one program per shape)."""
    import jax
    from flax import nnx

    model = Qwen3VL(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) * 10.0 if x.ndim >= 2 else
                                               np.asarray(x) + 0.1 * rng.standard_normal(x.shape, np.float32)),
                         nnx.state(model, nnx.Param))
    nnx.update(model, state)
    return model


def with_generated(batch: "Batch", generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (B, T + G): each row's real prompt tokens followed by its G generated tokens, right-padded: the
    full-forward reference of a prefill + decode run."""
    b, t = batch.input_ids.shape
    steps = generated.shape[1]
    lens = batch.attention_mask.sum(1)
    ids = np.zeros((b, t + steps), np.int32)
    mask = np.zeros((b, t + steps), np.int32)
    for i in range(b):
        ids[i, :lens[i]] = batch.input_ids[i, :lens[i]]
        ids[i, lens[i]:lens[i] + steps] = generated[i]
        mask[i, :lens[i] + steps] = 1
    return ids, mask


def _lookup(state, key):
    from .convert import CheckpointError

    if key not in state:
        raise CheckpointError(f"state dict: missing tensor {key!r}")
    return state[key]


@dataclasses.dataclass
class Batch:
    """A right-padded multimodal batch (numpy)."""

    input_ids: np.ndarray  # (B, T) int32
    attention_mask: np.ndarray  # (B, T) int32
    pixel_values: np.ndarray | None  # (N, patch_dim) float32
    image_grid_thw: np.ndarray | None  # (n_images, 3) int64
    mm_token_type_ids: np.ndarray  # (B, T) int32: 1 at <|image_pad|>


def make_batch(cfg: Qwen3VLConfig, images_per_sample, text_lens, seed: int = 0, pad_to: int | None = None) -> Batch:
    """Random prompts: sample b = text, then for each image (t, h, w) <vision_start> pads <vision_end> text.

    images_per_sample: list (per sample) of lists of grids (t, h, w) in patches (h, w multiples of merge).
    text_lens: per-sample length of each text run. Token ids avoid the special ids; right padding to the
    longest sample (or pad_to).
    """
    rng = np.random.default_rng(seed)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    normal = np.array([i for i in range(cfg.text.vocab_size) if i not in special])
    merge = cfg.vision.merge_unit
    rows, grids = [], []
    for grids_b, n_text in zip(images_per_sample, text_lens):
        seq = list(rng.choice(normal, n_text))
        for g in grids_b:
            seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * (int(np.prod(g)) // merge)
            seq += [cfg.vision_end_token_id] + list(rng.choice(normal, n_text))
            grids.append(g)
        rows.append(seq)
    t = max(len(r) for r in rows) if pad_to is None else pad_to
    ids = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    if grids:
        grid = np.array(grids, np.int64)
        n = int(np.prod(grid, axis=1).sum())
        pixels = rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)
    else:
        grid, pixels = None, None
    return Batch(ids, mask, pixels, grid, (ids == cfg.image_token_id).astype(np.int32))


def hf_logits(hf_model, batch: Batch) -> np.ndarray:
    """transformers logits (B, T, V) as numpy for a Batch."""
    import torch

    kwargs = dict(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                  attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long))
    if batch.pixel_values is not None:
        kwargs.update(pixel_values=torch.tensor(batch.pixel_values),
                      image_grid_thw=torch.tensor(batch.image_grid_thw),
                      mm_token_type_ids=torch.tensor(batch.mm_token_type_ids, dtype=torch.int32))
    with torch.no_grad():
        return hf_model(**kwargs).logits.float().numpy()
