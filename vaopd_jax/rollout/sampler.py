"""The student rollout sampler: jitted prefill + KV-cache decode loop for Qwen3-VL.

A `Sampler` is built once from the model and the rollout settings (and the mesh), then called per batch with
the params, a `data.batch.PromptBatch` and a key (the gemma `Sampler` convention):

    from vaopd_jax.rollout import sampler
    rollouts = sampler.Sampler(model, max_new_tokens=4096, num_samples=4, temperature=0.7, top_p=0.95,
                               valid_vocab_size=151669, mesh=mesh)
    out = rollouts(params, prompt_batch, rng)       # params: nnx.state(model, nnx.Param), e.g. the train state's

`generate` is the one-call form over the model's flat image layout (docs/api.md):

    out = sampler.generate(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
                           max_new_tokens, num_samples=1, temperature=1.0, top_p=1.0, top_k=0,
                           eos_token_ids=(151645, 151643), rng=None, valid_vocab_size=None,
                           suppress_token_ids=None)
    out.tokens          (B*num_samples, max_new_tokens) int32, samples of one prompt adjacent, pad_token_id after the end
    out.response_mask   (B*num_samples, max_new_tokens) int32, 1 up to and including the first end token
    out.lengths         (B*num_samples,) int32 response lengths (= response_mask.sum(-1))
    out.logprobs        (B*num_samples, max_new_tokens) float32 log-prob under the sampling distribution (0 off-mask)
    out.model_logprobs  (B*num_samples, max_new_tokens) float32 student's temperature-1 log-prob (0 off-mask)
    out.finished        (B*num_samples,) bool: an end token was emitted (False = truncated at max_new_tokens)

How one call runs (one XLA program per shape bucket, see `compile_count()`):
1. host: check the prompts (right-padded, none empty, room in the cache); the PromptBatch already holds the
   MRoPE position ids and each prompt's images padded to its patch bucket, computed once by the pipeline;
2. device, one jitted function under the mesh context: vision tower once per prompt (vmapped over the prompts,
   features gathered to the <|image_pad|> tokens) → prefill of the B prompts ONCE into a KV cache of
   Tp + bucket(max_new_tokens) slots → the cache and the last-token logits are repeated num_samples times along the
   batch (prefix sharing; samples of one prompt adjacent) → the decode loop (rollout/decode.py): one token per
   iteration, sampled from the previous step's logits (the prefill's for the first) and fed back, until every
   row has emitted an end token or max_new_tokens tokens exist; each step reads the cache only up to the
   current slot, and the loop runs in stages over shrinking row buckets so that finished rows stop costing
   (`decode_stages`).

Decode positions. For a row with L real prompt tokens and rope delta d (get_rope_index), the k-th generated
token (k = 0, 1, ...) has position L + d + k on all three MRoPE axes, i.e. max prompt position + 1 + k. This is
what transformers uses (cache position of the left-padded batch = number of real tokens so far, + delta). The
prompts are right-padded here, so the cache slot (Tp + k, shared by all rows) is NOT the position.

Log-probs: `logprobs` is the log-prob of each token under the distribution it was sampled from (temperature,
top-k, top-p and the vocabulary mask applied; 0 for greedy, a point mass); `model_logprobs` is the student's
own temperature-1, unfiltered log-prob over the valid vocabulary, the quantity the train step recomputes
(see rollout/logits.py). They coincide at temperature 1, top-k 0, top-p 1.

Suppressed ids. `suppress_token_ids` (default: the config's <|image_pad|>, <|video_pad|>, <|vision_start|>,
<|vision_end|> ids) are masked exactly like the padded vocabulary rows (logit -inf before sampling and in
both log-probs): a generated vision token would make the train step's get_rope_index expect image features
that do not exist. Ids >= vocab_size are ignored (tiny configs).

Sharding: pass `mesh=` (and keep the params on it, e.g. `sharding.shard_model`): the program is traced and run
under `jax.set_mesh(mesh)` like the train step, so the model's activation constraints apply; prompts, the KV
cache and the outputs are sharded over the batch on ('data', 'fsdp') and the cache's KV heads over 'tensor'
(the model's rule table); dimensions the mesh does not divide stay replicated. Random draws use `jax.random`
with partitionable threefry, so the tokens do not depend on the mesh.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.data import batch as batch_lib
from vaopd_jax.data.batch import PromptBatch
from vaopd_jax.data.tokenizer import END_TOKEN_IDS
from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import sharding as model_sharding
from vaopd_jax.parallel.mesh import on_mesh
from vaopd_jax.rollout import decode
from vaopd_jax.rollout import logits as logit_ops
from vaopd_jax.rollout import masks


class SamplerOutput(NamedTuple):
    """Rollouts of B prompts x num_samples; R = B * num_samples rows, samples of one prompt adjacent."""

    tokens: jax.Array  # (R, N) int32, pad_token_id outside the response mask
    response_mask: jax.Array  # (R, N) int32
    lengths: jax.Array  # (R,) int32
    logprobs: jax.Array  # (R, N) float32, sampling distribution; 0 outside the mask
    model_logprobs: jax.Array  # (R, N) float32, student temperature 1; 0 outside the mask
    finished: jax.Array  # (R,) bool


# ----------------------------------------------------------------------------- buckets & compile counter
_COMPILES: collections.Counter = collections.Counter()


def compile_count() -> int:
    """Number of sampler programs traced (= compiled) in this process so far."""
    return sum(_COMPILES.values())


def bucket_size(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): the static shape n is padded to."""
    n = max(int(n), int(minimum))
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Program:
    """Everything static about one compiled sampler program (its jit cache key, with the shapes)."""

    graphdef: Any
    num_samples: int
    params: logit_ops.SamplingParams
    new_bucket: int
    cache_dtype: str
    mesh: Any
    decode_stages: int = decode.MAX_STAGES  # row buckets of the decode loop (1 = no compaction), rollout/decode.py


# ----------------------------------------------------------------------------- device side
def _constrain(x, mesh, logical_axes):
    if mesh is None:
        return x
    spec = model_sharding.logical_to_spec(logical_axes, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _constrain_cache(cache: qwen3_vl.KVCache, mesh) -> qwen3_vl.KVCache:
    kv_axes = ("layers", "batch", "kv_heads", None, "head_dim")
    return qwen3_vl.KVCache(k=_constrain(cache.k, mesh, kv_axes), v=_constrain(cache.v, mesh, kv_axes),
                            valid=_constrain(cache.valid, mesh, ("batch", None)))


def repeat_cache(cache: qwen3_vl.KVCache, num_samples: int) -> qwen3_vl.KVCache:
    """Prefix sharing: each prompt's cache row repeated num_samples times, copies adjacent.

    k, v (L, B, K, S, D) → (L, B*num_samples, K, S, D); valid (B, S) → (B*num_samples, S).
    """
    if num_samples == 1:
        return cache
    return qwen3_vl.KVCache(k=jnp.repeat(cache.k, num_samples, axis=1), v=jnp.repeat(cache.v, num_samples, axis=1),
                            valid=jnp.repeat(cache.valid, num_samples, axis=0))


def _run(params, input_ids, attention_mask, position_ids, next_position, pixel_values, vision_inputs, image_rows,
         max_new_tokens, rng, eos, pad, valid_vocab_size, suppress, program: _Program):
    """The whole rollout as one traced function (see the module docstring for the steps).

    input_ids / attention_mask (B, T); position_ids (3, B, T); next_position (B,) = max position + 1;
    pixel_values (B, Np, patch_dim) or None, vision_inputs with a leading B axis, image_rows (B * Np / merge^2,)
    (PromptBatch.image_rows()); max_new_tokens scalar int32 (<= program.new_bucket);
    eos (E,) int32 end-token ids; suppress (S,) int32 ids never sampled (-1 = unused entry);
    pad, valid_vocab_size int32 scalars. These are data, not part of the
    program key, so changing them does not compile a new program.
    """
    _COMPILES[(input_ids.shape, program.new_bucket, None if pixel_values is None else pixel_values.shape[:2],
               program.num_samples, program.params)] += 1  # trace-time side effect: counts compilations
    mesh, sampling = program.mesh, program.params
    model = nnx.merge(program.graphdef, params)
    batch, prompt_len = input_ids.shape
    num_rows = batch * program.num_samples
    n_new = program.new_bucket

    input_ids = _constrain(input_ids, mesh, ("batch", None))
    image_embeds, deepstack = None, None
    if pixel_values is not None:
        image_embeds, deepstack = model.encode_prompt_images(pixel_values, vision_inputs, image_rows)

    # Slots [0, T) hold the prompt; generated token t (t = 0, 1, ...), fed back, goes to slot T + t.
    cache = model.init_cache(batch, prompt_len + n_new, jnp.dtype(program.cache_dtype))
    cache = _constrain_cache(cache, mesh)
    last_logits, cache = model.prefill(input_ids, attention_mask, position_ids, cache=cache,
                                       image_embeds=image_embeds, deepstack_embeds=deepstack, last_only=True)
    # Prefix sharing: one prefill per prompt, its cache and next-token logits copied to its samples.
    cache = _constrain_cache(repeat_cache(cache, program.num_samples), mesh)
    last_logits = _constrain(jnp.repeat(last_logits, program.num_samples, axis=0), mesh, ("batch", None))
    next_position = jnp.repeat(next_position, program.num_samples, axis=0)

    vocab_ids = jnp.arange(model.config.text.vocab_size, dtype=jnp.int32)
    suppressed = jnp.any(vocab_ids[None, :] == suppress[:, None], axis=0)  # (V,) bool

    groups = decode.row_groups(num_rows, mesh)
    tokens, logprobs, model_logprobs = decode.decode(
        model, cache, last_logits, next_position, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
        num_new=n_new, rng=rng, eos=eos, pad=pad, valid_vocab_size=valid_vocab_size, suppressed=suppressed,
        params=sampling, row_groups=groups,
        schedule=decode.compaction_schedule(num_rows, groups, max_stages=program.decode_stages),
        constrain=lambda x, axes: _constrain(x, mesh, axes))

    generated = jnp.arange(n_new)[None, :] < max_new_tokens
    response_mask = masks.response_mask(tokens, eos, generated)
    tokens = masks.pad_after_end(tokens, response_mask, pad)
    as_float = response_mask.astype(jnp.float32)
    return SamplerOutput(
        tokens=_constrain(tokens, mesh, ("batch", None)),
        response_mask=_constrain(response_mask, mesh, ("batch", None)),
        lengths=masks.response_lengths(response_mask),
        logprobs=logprobs * as_float,
        model_logprobs=model_logprobs * as_float,
        finished=jnp.any(masks.is_end_token(tokens, eos) & response_mask.astype(bool), axis=-1),
    )


_run_jit = jax.jit(_run, static_argnames=("program",))


# ----------------------------------------------------------------------------- host side
def _eos_array(eos: tuple[int, ...]) -> np.ndarray:
    """End ids as int32 data padded with -1 (never a token) to a multiple of 8: one program for any set."""
    out = np.full((max(8, -(-len(eos) // 8) * 8),), -1, np.int32)
    out[:len(eos)] = eos
    return out


def _check_prompts(input_ids, attention_mask) -> np.ndarray:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T); got shape {input_ids.shape}")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch: input_ids has 0 rows; pass at least one prompt")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has 0 columns; every prompt needs at least one token")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    mask = attention_mask.astype(bool)
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no real tokens "
                         "(attention_mask all 0)")
    right_padded = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if (mask != right_padded).any():
        bad = np.flatnonzero((mask != right_padded).any(axis=1)).tolist()
        raise ValueError(f"prompts must be right-padded (attention_mask = 1...1 0...0); rows {bad} are not")
    return lengths


class Sampler:
    """Student rollouts, built once from the model and the rollout settings, called per batch.

        rollouts = Sampler(model, max_new_tokens=..., num_samples=4, temperature=..., mesh=mesh)
        out = rollouts(params, prompt_batch, rng)     # -> SamplerOutput of device arrays (B * num_samples rows)

    model: a Qwen3VL (its weights are not kept: only its graph, config and compute dtype). params: the Param
    state of a model of that graph (nnx.state(model, nnx.Param), or a train state's params). The settings are
    validated here, once; each call checks only the prompts.

    Settings: max_new_tokens >= 1; num_samples >= 1 (the rollouts of each prompt, config
    rollout.num_rollouts; adjacent rows); temperature 0 → greedy (top_k / top_p ignored, as in transformers);
    eos_token_ids: end tokens (default <|im_end|>, <|endoftext|>); valid_vocab_size: logit rows >= it are never
    sampled (LM-head padding); pad_token_id fills tokens after the end (default: the first end token, as
    transformers does); suppress_token_ids: ids never sampled (default the config's vision special ids; () for
    none); max_length: the longest prompt + max_new_tokens allowed (default the model's
    max_position_embeddings); cache_dtype (default the compute dtype); top_p_candidates (a speed knob);
    min_new_bucket: the smallest new-token bucket; decode_stages: row buckets of the decode loop
    (rollout/decode.py: finished rows are compacted out between stages; 1 = every row is decoded until the last
    one ends; the tokens are the same up to float rounding).
    """

    def __init__(self, model: qwen3_vl.Qwen3VL, *, max_new_tokens: int, num_samples: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_ids: Sequence[int] = END_TOKEN_IDS, valid_vocab_size: int | None = None,
                 pad_token_id: int | None = None, suppress_token_ids: Sequence[int] | None = None,
                 mesh: jax.sharding.Mesh | None = None, max_length: int | None = None, cache_dtype=None,
                 top_p_candidates: int = 256, min_new_bucket: int = 16, decode_stages: int = decode.MAX_STAGES):
        cfg = model.config
        vocab = cfg.text.vocab_size
        def integer(value):  # bool is an int to Python: True would silently mean 1
            return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

        if not (integer(max_new_tokens) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
        if not (integer(num_samples) and num_samples >= 1):
            raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
        if not (integer(decode_stages) and decode_stages >= 1):
            raise ValueError(f"decode_stages must be an int >= 1 (1 = no row compaction); got {decode_stages!r}")
        eos = tuple(int(e) for e in eos_token_ids)
        for e in eos:
            if not 0 <= e < vocab:
                raise ValueError(f"eos_token_ids entry {e} is outside the model vocabulary [0, {vocab})")
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        if not 0 <= int(pad_token_id) < vocab:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the model vocabulary [0, {vocab})")
        valid_vocab_size = vocab if valid_vocab_size is None else int(valid_vocab_size)
        if not 1 <= valid_vocab_size <= vocab:
            raise ValueError(f"valid_vocab_size must be in [1, {vocab}]; got {valid_vocab_size}")
        # Validated as given (float("0.7") or int(2.5) would hide a wrong type), then normalised for the program key.
        logit_ops.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, top_p_candidates=top_p_candidates)
        sampling = logit_ops.SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                            top_p_candidates=int(top_p_candidates))
        if sampling.greedy:  # top-k / top-p do not apply: one greedy program whatever they are
            sampling = logit_ops.SamplingParams(temperature=0.0)
        if suppress_token_ids is None:
            suppress_token_ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                  cfg.vision_end_token_id)
        suppress = tuple(int(i) for i in suppress_token_ids)
        if any(i < 0 for i in suppress):
            raise ValueError(f"suppress_token_ids must be non-negative token ids; got {suppress}")
        suppress = tuple(i for i in suppress if i < vocab)
        if len({i for i in suppress if i < valid_vocab_size}) >= valid_vocab_size:
            raise ValueError(f"suppress_token_ids {suppress} leave no token of the valid vocabulary "
                             f"[0, {valid_vocab_size}) to sample")
        if mesh is not None and any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
            raise ValueError(f"mesh axis_types must all be AxisType.Auto (GSPMD propagation); got {mesh.axis_types}. "
                             "Build it with jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)")
        self.config = cfg
        self.mesh = mesh
        self.num_samples = int(num_samples)
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = cfg.text.max_position_embeddings if max_length is None else int(max_length)
        self.program = _Program(
            graphdef=nnx.split(model, nnx.Param)[0], num_samples=int(num_samples), params=sampling,
            new_bucket=bucket_size(max_new_tokens, min_new_bucket),
            cache_dtype=jnp.dtype(cache_dtype or model.compute_dtype).name, mesh=mesh,
            decode_stages=int(decode_stages))
        self._data = (np.int32(max_new_tokens), _eos_array(eos), np.int32(pad_token_id), np.int32(valid_vocab_size),
                      _eos_array(suppress))
        self._run = _run_jit if mesh is None else on_mesh(_run_jit, mesh)

    @classmethod
    def for_model(cls, model: qwen3_vl.Qwen3VL, **settings) -> tuple["Sampler", Any]:
        """(Sampler, params) of a concrete model: `rollouts, params = Sampler.for_model(model, ...)`."""
        return cls(model, **settings), nnx.state(model, nnx.Param)

    def _arguments(self, params, prompts: PromptBatch, rng) -> tuple:
        if not isinstance(prompts, PromptBatch):
            raise TypeError(f"the sampler takes a data.batch.PromptBatch (the pipeline's batches, or "
                            f"data.batch.from_flat(...)); got {type(prompts).__name__}")
        lengths = _check_prompts(np.asarray(prompts.input_ids), np.asarray(prompts.attention_mask))
        longest = int(lengths.max())
        if longest + self.max_new_tokens > self.max_length:
            row = int(np.argmax(lengths))
            raise ValueError(f"prompt row {row} has {longest} tokens; with max_new_tokens={self.max_new_tokens} it "
                             f"needs {longest + self.max_new_tokens} cache slots but the cache allows "
                             f"max_length={self.max_length}")
        if rng is None:
            rng = jax.random.key(0)
        elif isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        args = [np.asarray(prompts.input_ids, np.int32), np.asarray(prompts.attention_mask, np.int32),
                np.asarray(prompts.position_ids, np.int32), prompts.next_positions]
        images = (prompts.pixel_values, prompts.vision_inputs, prompts.image_rows())
        if self.mesh is not None:
            # Prompts split over the batch axes; the image gather indexes all prompts' features (replicated).
            put = lambda a, axes: jax.device_put(a, jax.sharding.NamedSharding(  # noqa: E731
                self.mesh, model_sharding.logical_to_spec(axes, mesh=self.mesh, shape=np.shape(a))))
            axes = [("batch", None), ("batch", None), (None, "batch", None), ("batch",)]
            args = [put(a, ax) for a, ax in zip(args, axes)]
            if images[0] is not None:
                by_prompt = lambda x: put(x, ("batch",) + (None,) * (np.ndim(x) - 1))  # noqa: E731
                images = (by_prompt(images[0]), type(images[1])(*(by_prompt(f) for f in images[1])),
                          put(images[2], (None,)))
        max_new_tokens, eos, pad, valid_vocab_size, suppress = self._data
        return (params, *args, *images, max_new_tokens, rng, eos, pad, valid_vocab_size, suppress)

    def __call__(self, params, prompts: PromptBatch, rng=None) -> SamplerOutput:
        """num_samples samples for each prompt of `prompts` (no filler rows: `prompts.without_filler()`). rng: a PRNG key or
        an int seed (None → seed 0). Returns a `SamplerOutput` of device arrays with max_new_tokens columns."""
        out = self._run(*self._arguments(params, prompts, rng), program=self.program)
        if self.program.new_bucket == self.max_new_tokens:
            return out
        cut = lambda a: a[:, :self.max_new_tokens]  # noqa: E731
        return out._replace(tokens=cut(out.tokens), response_mask=cut(out.response_mask),
                            logprobs=cut(out.logprobs), model_logprobs=cut(out.model_logprobs))

    def lower(self, params, prompts: PromptBatch, rng=None) -> jax.stages.Lowered:
        """The lowered program for these inputs, e.g. for `.compile().memory_analysis()` / `.cost_analysis()` in
        benchmarks and ahead-of-time memory checks."""
        return self._run.lower(*self._arguments(params, prompts, rng), program=self.program)


def _flat_prompts(model, input_ids, attention_mask, pixel_values, image_grid_thw, min_prompt_bucket: int):
    """The PromptBatch of `generate`'s flat inputs, prompts re-padded to a power-of-two bucket."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    lengths = _check_prompts(input_ids, attention_mask)
    return batch_lib.from_flat(input_ids, attention_mask, pixel_values, image_grid_thw, model.config,
                               prompt_len=bucket_size(int(lengths.max()), min_prompt_bucket))


def generate(model: qwen3_vl.Qwen3VL, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_ids: Sequence[int] = END_TOKEN_IDS, rng=None, min_prompt_bucket: int = 16,
             **settings) -> SamplerOutput:
    """Sample num_samples responses for each of B prompts (see the module docstring): `Sampler` in one call.

    input_ids, attention_mask: (B, T) int, right-padded (1 = real token). pixel_values (N, patch_dim) rows of
    all images in order, image_grid_thw (n_images, 3), or both None. Prompts are padded to a power-of-two
    bucket >= min_prompt_bucket (one compiled program per bucket). rng: a PRNG key or an int seed (None → seed
    0). Other keyword arguments (valid_vocab_size, pad_token_id, suppress_token_ids, mesh, max_length,
    cache_dtype, top_p_candidates, min_new_bucket, decode_stages) are `Sampler` settings. Returns a
    `SamplerOutput` of device arrays.
    """
    prompts = _flat_prompts(model, input_ids, attention_mask, pixel_values, image_grid_thw, min_prompt_bucket)
    rollouts, params = Sampler.for_model(
        model, max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature, top_p=top_p,
        top_k=top_k, eos_token_ids=eos_token_ids, **settings)
    return rollouts(params, prompts, rng)


def lower(model: qwen3_vl.Qwen3VL, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
          rng=None, min_prompt_bucket: int = 16, **settings) -> jax.stages.Lowered:
    """The lowered sampler program for these inputs (keyword arguments as for `generate`)."""
    prompts = _flat_prompts(model, input_ids, attention_mask, pixel_values, image_grid_thw, min_prompt_bucket)
    rollouts, params = Sampler.for_model(model, **settings)
    return rollouts.lower(params, prompts, rng)
