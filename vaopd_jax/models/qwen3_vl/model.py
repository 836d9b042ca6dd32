"""`Qwen3VL`: the full vision-language model (vision tower + text decoder + lm_head) as a Flax NNX module.

Forward (same meaning as transformers' `Qwen3VLForConditionalGeneration`):
    logits = model(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   *, position_ids=None, vision_inputs=None, image_embeds=None, deepstack_embeds=None)
        input_ids (B, T) int32; attention_mask (B, T) 1 = real token (right padding);
        pixel_values (N, 1536) rows of all images in order (N may be padded, see prepare_vision_inputs);
        image_grid_thw (n_images, 3); -> logits (B, T, V) float32.
    hidden = model.hidden_states(...same...)   # (B, T, E) after the final norm, before the lm_head
    W = model.lm_head_kernel()                 # (E, V); tied -> embedding.T
Under jit pass `position_ids` (3, B, T) from `get_rope_index` and `vision_inputs` from `prepare_vision_inputs`
(host-side numpy); when they are None they are computed here from concrete arrays (not jittable).
Instead of pixel values, precomputed `image_embeds` (M, E) and `deepstack_embeds` (tuple of (M, E)) from
`model.encode_images(pixel_values, vision_inputs)` may be passed (run the vision tower once, reuse it).

KV cache (for the sampler):
    cache = model.init_cache(batch_size, max_length, dtype=None)       # KVCache pytree, slots all invalid
        k, v (L, B, K, S, D): heads before slots (see text.KVCache), valid (B, S).
    logits, cache = model.prefill(input_ids, attention_mask, position_ids, *, image_embeds=None,
                                  deepstack_embeds=None, cache, last_only=False)
        attends over the T prompt positions only (causal + key padding, as the forward) and writes their keys
        and values to slots [0, T) (padding slots stay invalid); logits (B, T, V), or (B, V) at each row's last
        real token when last_only=True.
    logits, cache = model.decode_step(token_ids, position_ids, cache, cache_index, *, rows=None, write=None,
                                      row_groups=1, block_size=128)
        token_ids (B, 1); cache_index scalar int: the slot written, the same for every row; position_ids
        (3, B, 1): the token's MRoPE position, which is NOT cache_index + rope_delta for right-padded prompts:
        for a row with L real prompt tokens, rope delta d (get_rope_index) and k tokens generated before this
        one, it is L + d + k on all three axes (text tokens), i.e. what transformers uses for a left-padded
        batch. -> logits (B, 1, V) float32. Attends to the valid cache slots < cache_index plus itself (grouped
        attention, fp32 softmax), reading the cache block by block up to cache_index only (the cost follows the
        filled length, not S), then writes its key/value at cache_index with one in-place update.
        rows (R',) int32 runs R' token rows against cache rows `rows` (token_ids (R', 1), position_ids
        (3, R', 1), logits (R', 1, V)): the sampler decodes only its unfinished rows this way; write (R',) bool
        leaves padding rows unwritten; row_groups keeps each gather/scatter inside one batch shard.
        Pure in the params: inside `jax.lax.while_loop` use `graphdef, state = nnx.split(model)` outside and
        `nnx.merge(graphdef, state).decode_step(...)` inside (or close over the model in a function passed to
        nnx.jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import MaskSpec
from .config import Qwen3VLConfig
from .layers import param
from .rope import VisionInputs, get_rope_index, mrope_cos_sin, prepare_vision_inputs, text_position_ids
from .sharding import constrain
from .text import KVCache, TextModel
from .vision import VisionTower


class Qwen3VL(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, param_dtype=jnp.float32, compute_dtype=None, *,
                 rngs: nnx.Rngs | None = None, remat: str | None = None):
        if remat is not None:
            cfg = cfg.replace(remat=remat)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        compute_dtype = compute_dtype or param_dtype
        self.config = cfg
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        self.visual = VisionTower(cfg, param_dtype, compute_dtype, rngs)
        self.language_model = TextModel(cfg, param_dtype, compute_dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.text.hidden_size, cfg.text.vocab_size), ("embed", "vocab"), param_dtype)

    # ------------------------------------------------------------------ pieces
    def lm_head_kernel(self):
        """(E, V) output projection; the transposed embedding when tied."""
        if self.config.tie_word_embeddings:
            return self.language_model.embed_tokens[...].T
        return self.lm_head[...]

    def logits_from_hidden(self, hidden, lm_head=None):
        """hidden (..., E) -> logits (..., V) float32 (matmul in compute dtype, fp32 accumulation). lm_head: the
        (E, V) kernel already in the compute dtype (`lm_head_kernel()` cast once outside a decode loop), or None."""
        w = self.lm_head_kernel().astype(self.compute_dtype) if lm_head is None else lm_head
        logits = jnp.einsum("...e,ev->...v", hidden.astype(self.compute_dtype), w, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))

    def encode_images(self, pixel_values, vision_inputs: VisionInputs):
        """pixel_values (N, patch_dim) -> (image_embeds (N/4, E), tuple of deepstack features (N/4, E))."""
        return _dispatch(_encode_jit, _encode, self, pixel_values, vision_inputs)

    def encode_prompt_images(self, pixel_values, vision_inputs: VisionInputs, image_rows):
        """The vision tower once per prompt, then its features in <|image_pad|> order (the sampler and the step).

        pixel_values (P, Np, patch_dim) and vision_inputs with a leading P axis (each prompt's images padded to
        Np rows, `data.batch.PromptBatch`); image_rows (n,) int: row p * Np / merge^2 + i is feature i of prompt p
        (`PromptBatch.image_rows`, which may repeat a prompt for its K rollouts). Returns (image_embeds (n, E),
        tuple of deepstack features (n, E)) for `image_embeds=` / `deepstack_embeds=`.
        """
        embeds, deepstack = jax.vmap(self.encode_images)(pixel_values, vision_inputs)
        take = lambda x: jnp.take(x.reshape(-1, x.shape[-1]), image_rows, axis=0)  # noqa: E731
        return take(embeds), tuple(take(d) for d in deepstack)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                      position_ids=None, vision_inputs=None, image_embeds=None, deepstack_embeds=None):
        """Final hidden states (B, T, E) after the final norm (compute dtype)."""
        args = self._prepare(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs)
        return _dispatch(_hidden_jit, _hidden_and_logits, self, *args, image_embeds, _tuple(deepstack_embeds), False)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                 position_ids=None, vision_inputs=None, image_embeds=None, deepstack_embeds=None):
        """Logits (B, T, V) float32, equal to transformers' Qwen3VLForConditionalGeneration logits."""
        args = self._prepare(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs)
        return _dispatch(_hidden_jit, _hidden_and_logits, self, *args, image_embeds, _tuple(deepstack_embeds), True)

    def _prepare(self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_inputs):
        """Host-side defaults (concrete arrays only): mask, MRoPE position ids, vision inputs."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            if image_grid_thw is None:
                position_ids = text_position_ids(attention_mask)
            else:
                position_ids, _ = get_rope_index(np.asarray(input_ids), np.asarray(image_grid_thw),
                                                 np.asarray(attention_mask), self.config)
        if pixel_values is not None and vision_inputs is None:
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw or vision_inputs")
            vision_inputs = prepare_vision_inputs(np.asarray(image_grid_thw), self.config,
                                                  pad_patches_to=pixel_values.shape[0])
        return input_ids, attention_mask, position_ids, pixel_values, vision_inputs

    def _hidden_impl(self, input_ids, attention_mask, position_ids, pixel_values, vision_inputs, image_embeds,
                     deepstack_embeds):
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("pass either pixel_values or image_embeds, not both")
            image_embeds, deepstack_embeds = self.visual(pixel_values, vision_inputs)
        lm = self.language_model
        x = lm.embed(input_ids, image_embeds)
        cos, sin = mrope_cos_sin(position_ids, self.config.text)
        t = input_ids.shape[1]
        # Causal + key padding (transformers' create_causal_mask); padded query rows still see real keys.
        mask = MaskSpec(key_valid=attention_mask.astype(bool), causal=True)
        if self.config.attention_impl == "xla":
            mask = mask.dense(input_ids.shape[0], t, t)  # (B, 1, T, T)
        x, _ = lm.run_layers(x, cos, sin, mask, input_ids, deepstack_embeds or ())
        return lm.final_norm(x)

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """Empty cache: k, v (L, B, K, S, D) zeros of `dtype` (default compute dtype), valid (B, S) False."""
        t = self.config.text
        shape = (t.num_hidden_layers, batch_size, t.num_key_value_heads, max_length, t.head_dim)
        dtype = dtype or self.compute_dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       valid=jnp.zeros((batch_size, max_length), bool))

    def prefill(self, input_ids, attention_mask, position_ids, *, cache: KVCache, image_embeds=None,
                deepstack_embeds=None, pixel_values=None, vision_inputs=None, last_only: bool = False):
        """Runs the prompt (B, T) and writes cache slots [0, T). Returns (logits, cache): logits (B, T, V), or
        (B, V) at each row's last real token when last_only."""
        if pixel_values is not None:
            image_embeds, deepstack_embeds = self.visual(pixel_values, vision_inputs)
        deepstack_embeds = _tuple(deepstack_embeds)
        b, t = input_ids.shape
        s = cache.k.shape[3]
        if t > s:
            raise ValueError(f"prompt length {t} exceeds the cache length {s}")
        amask = attention_mask.astype(bool)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, amask, 0, axis=1)
        lm = self.language_model
        x = lm.embed(input_ids, image_embeds)
        cos, sin = mrope_cos_sin(position_ids, self.config.text)
        # Only the T prompt positions: the slots >= T hold nothing yet (the forward's causal + key padding mask,
        # routed through cfg.attention_impl like the forward).
        mask = MaskSpec(key_valid=amask, causal=True)
        if self.config.attention_impl == "xla":
            mask = mask.dense(b, t, t)  # (B, 1, T, T)
        x, (k, v) = lm.run_layers(x, cos, sin, mask, input_ids, deepstack_embeds, return_kv=True)
        # (L, B, T, K, D) -> (L, B, K, T, D): the prompt-sized transpose happens once, here, not per decode step.
        k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.transpose(0, 1, 3, 2, 4).astype(cache.k.dtype), 0, 3)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.transpose(0, 1, 3, 2, 4).astype(cache.v.dtype), 0, 3)
        hidden = lm.final_norm(x)
        if last_only:
            last = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
            hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return self.logits_from_hidden(hidden), KVCache(k=k_all, v=v_all, valid=valid)

    def decode_step(self, token_ids, position_ids, cache: KVCache, cache_index, *, rows=None, write=None,
                    row_groups: int = 1, block_size: int = 128, lm_head=None):
        """One token per row at slot cache_index (see the module docstring for position_ids).
        token_ids (R', 1), position_ids (3, R', 1) -> (logits (R', 1, V) float32, cache).

        rows (R',) int32: the cache row of each token row (None: R' = B, token row i is cache row i), gathered
        within `row_groups` contiguous groups of the batch (text.gather_rows: the batch shards of a mesh);
        write (R',) bool: rows whose key/value are written (None: all; False for padding rows that duplicate
        another row). Only slots < cache_index are read, in blocks of block_size (text.cached_attention).
        lm_head: see `logits_from_hidden`."""
        lm = self.language_model
        x = lm.embed(token_ids)
        cos, sin = mrope_cos_sin(position_ids, self.config.text)
        x, (k_new, v_new) = lm.run_layers_decode(x, cos, sin, cache, cache_index, rows=rows, row_groups=row_groups,
                                                 block_size=block_size)
        logits = self.logits_from_hidden(lm.final_norm(x), lm_head)
        return logits, write_cache(cache, k_new, v_new, cache_index, rows, write, row_groups)


def write_cache(cache: KVCache, k_new, v_new, cache_index, rows=None, write=None, row_groups: int = 1) -> KVCache:
    """Writes one new key/value per row at slot cache_index and marks it valid.

    k_new, v_new (L, R', K, D); rows / write / row_groups as in `Qwen3VL.decode_step`. Without rows: one
    (L, B, K, 1, D) in-place dynamic_update_slice (the cache is a while-loop carry, never copied). With rows: the
    slot's column (L, B, K, 1, D) is read, the R' rows are scattered into it (each group into its own slice of
    the batch; unwritten rows dropped) and the column is written back the same way: only one slot's worth of
    data moves, in place.
    """
    index = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, zero, index, zero)
    b = cache.valid.shape[0]
    if rows is None and write is None:
        k_col, v_col = k_new[:, :, :, None], v_new[:, :, :, None]
        valid_col = jnp.ones((b, 1), bool)
    else:
        r = k_new.shape[1]
        rows = jnp.arange(r, dtype=jnp.int32) if rows is None else rows
        if write is not None:
            rows = jnp.where(write, rows, b)  # out of range: dropped
        column = lambda a: jax.lax.dynamic_slice_in_dim(a, index, 1, axis=3)  # noqa: E731
        k_col = scatter_rows_grouped(column(cache.k), k_new[:, :, :, None], rows, row_groups, axis=1)
        v_col = scatter_rows_grouped(column(cache.v), v_new[:, :, :, None], rows, row_groups, axis=1)
        valid_col = scatter_rows_grouped(jax.lax.dynamic_slice_in_dim(cache.valid, index, 1, axis=1),
                                         jnp.ones((r, 1), bool), rows, row_groups, axis=0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k_col.astype(cache.k.dtype), at)
    v_all = jax.lax.dynamic_update_slice(cache.v, v_col.astype(cache.v.dtype), at)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid_col, index, axis=1)
    return KVCache(k=k_all, v=v_all, valid=valid)


def scatter_rows_grouped(x, values, rows, row_groups: int, axis: int):
    """x with x[rows] = values along `axis` (the batch): x (..., B, ...), values (..., R', ...), rows (R',) int32.

    The batch is split into row_groups contiguous groups and entry e (of group e // (R'/row_groups)) writes a
    row of its own group (text.gather_rows' layout): a batched scatter over the groups, local to each batch
    shard. Rows out of range (e.g. B) are dropped.
    """
    b, r = x.shape[axis], values.shape[axis]
    per_group, picked = b // row_groups, r // row_groups
    rows = rows.reshape(row_groups, picked)
    local = rows - (jnp.arange(row_groups, dtype=jnp.int32) * per_group)[:, None]
    local = jnp.where((local >= 0) & (local < per_group) & (rows < b), local, per_group)  # out of group: dropped
    split = lambda a, n: a.reshape(*a.shape[:axis], row_groups, n, *a.shape[axis + 1:])  # noqa: E731
    grouped, vals = split(x, per_group), split(values.astype(x.dtype), picked)
    index = (slice(None),) * axis + (jnp.arange(row_groups)[:, None], local)
    return grouped.at[index].set(vals, mode="drop").reshape(x.shape)


def _tuple(x):
    return tuple(x) if x is not None else ()


def _hidden_and_logits(model: Qwen3VL, input_ids, attention_mask, position_ids, pixel_values, vision_inputs,
                       image_embeds, deepstack_embeds, logits: bool):
    hidden = model._hidden_impl(input_ids, attention_mask, position_ids, pixel_values, vision_inputs, image_embeds,
                                deepstack_embeds)
    return model.logits_from_hidden(hidden) if logits else hidden


def _encode(model: Qwen3VL, pixel_values, vision_inputs):
    return model.visual(pixel_values, vision_inputs)


# Outside any trace the public methods run jitted: eager op-by-op execution re-traces (and recompiles) the layer
# scans on every call. Inside a trace (the caller's jit / grad / while_loop) they inline.
_hidden_jit = nnx.jit(_hidden_and_logits, static_argnums=(8,))
_encode_jit = nnx.jit(_encode)

# XLA's CPU backend has no bf16 matmul: it converts bf16 weights to f32, and loop-invariant code motion hoists
# those converts out of the layer scan, so a plain bf16 forward on the CPU held an f32 copy of every layer at once
# (a 2B forward peaked at 3.75x the parameters' bytes, bench.host_memory). Without that pass each layer is
# converted inside its iteration; accelerators multiply bf16 directly and keep the default passes.
_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _merged(plain):
    def call(graphdef, state, *args):
        return plain(nnx.merge(graphdef, state), *args)
    return call


_hidden_cpu_jit = jax.jit(_merged(_hidden_and_logits), static_argnums=(0, 9), compiler_options=_CPU_COMPILER_OPTIONS)
_encode_cpu_jit = jax.jit(_merged(_encode), static_argnums=(0,), compiler_options=_CPU_COMPILER_OPTIONS)
_CPU_VARIANTS = {id(_hidden_jit): _hidden_cpu_jit, id(_encode_jit): _encode_cpu_jit}


def _dispatch(jitted, plain, model, *args):
    leaves = jax.tree.leaves(args) + [model.language_model.norm[...]]
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return plain(model, *args)
    if jax.default_backend() == "cpu":
        graphdef, state = nnx.split(model)
        return _CPU_VARIANTS[id(jitted)](graphdef, state, *args)
    return jitted(model, *args)
