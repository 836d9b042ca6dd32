"""The sampler's decode loop (device side, traced inside the sampler's one jitted program).

After the prefill, R rows (B prompts x num_samples) decode one token per iteration of a `lax.while_loop`. Two
things keep the cost of a step proportional to what is still being generated rather than to what was
allocated:

- Filled length. Each decode step reads the KV cache only up to the current slot, block by block
  (`text.cached_attention`: a loop whose trip count is ceil(filled / block_size)), so a step early in a
  4,096-token rollout costs what a short rollout costs. The program's shape does not depend on
  max_new_tokens beyond the sizes of the cache and the output buffers: compilation stays bounded.
- Finished rows. The loop runs in stages over shrinking row buckets (`compaction_schedule`, e.g. 64 -> 16 ->
  4 rows). A stage ends when few enough rows are still unfinished to fit the next bucket; the next stage
  decodes only those rows: their token, position and logits are gathered, and each step reads and writes
  their cache rows through an index (`Qwen3VL.decode_step(rows=...)`), so the cache itself is never copied
  or reallocated. Each stage is one while loop with static shapes (one compiled body per bucket).
  Buckets are padded with copies of an unfinished row whose writes are dropped.

The tokens do not depend on the schedule up to float rounding: the step-`t` uniform of row r is element r of
`jax.random.uniform(fold_in(rng, t), (R,))` whichever bucket the row is decoded in (the same draw as a
full-batch step), and a row's logits do not depend on the other rows, except that a smaller bucket's matmuls
can round differently in the last bits (~5e-7 in the log-probs): a draw that falls that close to a boundary of
the cumulative distribution then picks the neighbouring token (seen in a 64-row, 256-token batch of the
bench's 50M config; bench.sample --part tail reports it).

Under a mesh the rows are sharded over the batch axes in `row_groups` contiguous groups; a row only moves
within its group (its device), so compaction and the indexed cache reads never cross devices. A stage ends
when every group's unfinished rows fit its share of the next bucket.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import sharding as model_sharding
from vaopd_jax.models.qwen3_vl.text import gather_rows
from vaopd_jax.rollout import logits as logit_ops
from vaopd_jax.rollout import masks

# Buckets shrink 4x per stage, down to MIN_BUCKET_ROWS rows, in at most MAX_STAGES stages: each stage is one
# more compiled loop body (decode step + sampling), so the count is kept small.
SHRINK_FACTOR = 4
MIN_BUCKET_ROWS = 4
MAX_STAGES = 2
BLOCK_SIZE = 128  # cache slots read per attention block (the filled length is rounded up to it)


def compaction_schedule(num_rows: int, row_groups: int = 1, shrink: int = SHRINK_FACTOR,
                        min_rows: int = MIN_BUCKET_ROWS, max_stages: int = MAX_STAGES) -> tuple[int, ...]:
    """Row bucket of each decode stage: num_rows, then / shrink while the bucket stays >= min_rows and a
    multiple of row_groups (every group keeps an equal share). E.g. 64 rows -> (64, 16); 8 rows -> (8,)."""
    sizes = [int(num_rows)]
    while len(sizes) < max_stages:
        nxt = sizes[-1] // shrink
        if nxt < min_rows or nxt % row_groups or nxt * shrink != sizes[-1]:
            break
        sizes.append(nxt)
    return tuple(sizes)


def row_groups(num_rows: int, mesh) -> int:
    """How many batch shards `num_rows` rows are split into on `mesh` (1 without a mesh): the groups within which
    rows are compacted, so that no row leaves its device."""
    if mesh is None:
        return 1
    spec = model_sharding.logical_to_spec(("batch",), mesh=mesh, shape=(num_rows,))[0]
    names = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))


class DecodeResult(NamedTuple):
    """Per row (R rows, N = new-token bucket): tokens (R, N) int32 (pad after a row ended, and beyond the
    steps run); logprobs, model_logprobs (R, N) float32 (0 where tokens are pad)."""

    tokens: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array


def _group_counts(active, row_groups: int):
    """active (R',) bool -> (row_groups,) int32 unfinished rows per group."""
    return jnp.sum(active.reshape(row_groups, -1).astype(jnp.int32), axis=1)


def _compact(rows, write, logits, done, size: int, row_groups: int):
    """The next stage's rows: the unfinished entries of each group first (in row order), padded to size / groups
    with copies of the group's first entry (write False). rows, write (R',); logits (R', V) -> (size,), (size, V)."""
    prev = rows.shape[0]
    per_prev, per = prev // row_groups, size // row_groups
    active = (write & ~done[rows]).reshape(row_groups, per_prev)
    order = jnp.argsort(~active, axis=1, stable=True)[:, :per]  # unfinished entries first, in order
    keep = jnp.take_along_axis(active, order, axis=1)
    pick = jnp.where(keep, order, order[:, :1]) + (jnp.arange(row_groups) * per_prev)[:, None]
    pick = pick.reshape(-1)
    return (gather_rows(rows, pick, row_groups), keep.reshape(-1), gather_rows(logits, pick, row_groups))


def decode(model: qwen3_vl.Qwen3VL, cache: qwen3_vl.KVCache, first_logits, next_position, *, prompt_len: int,
           max_new_tokens, num_new: int, rng, eos, pad, valid_vocab_size, suppressed,
           params: logit_ops.SamplingParams, row_groups: int = 1, schedule: tuple[int, ...] | None = None,
           block_size: int = BLOCK_SIZE, constrain=lambda x, axes: x) -> DecodeResult:
    """Samples up to max_new_tokens tokens per row after the prefill.

    cache: KVCache with R rows, the prompts in slots [0, prompt_len) and room for num_new more; first_logits
    (R, V) the prefill's next-token logits; next_position (R,) the first generated token's MRoPE position
    (then + 1 per token); max_new_tokens: scalar int32 <= num_new (data); eos (E,) end ids (-1 unused); pad,
    valid_vocab_size int32 scalars; suppressed (V,) bool ids never sampled; schedule: row buckets
    (`compaction_schedule`); constrain(x, logical_axes): the sampler's sharding constraint.
    Token t of a row is drawn with key fold_in(rng, t), goes to output column t and, fed back, to cache slot
    prompt_len + t at position next_position + t.
    """
    num_rows = first_logits.shape[0]
    schedule = schedule or compaction_schedule(num_rows, row_groups)
    if schedule[0] != num_rows:
        raise ValueError(f"the first decode bucket must hold all {num_rows} rows; got schedule {schedule}")

    def sample(step, step_logits, rows):
        step_logits = jnp.where(suppressed, logit_ops.NEG_INF, step_logits)
        uniform = None
        if not params.greedy:  # the full-batch draw, then this bucket's rows: independent of the bucket
            uniform = jax.random.uniform(jax.random.fold_in(rng, step), (num_rows,), jnp.float32)
            uniform = uniform if rows is None else uniform[rows]
        return logit_ops.sample_tokens(None, step_logits, params, valid_vocab_size, uniform=uniform)

    # Loop-invariant: the output projection in the compute dtype, gathered over the model axis once for all
    # stages (vocab stays split over 'tensor'). Left to XLA, each stage's loop hoists its own all-gather of the
    # fp32 weight, all live at once.
    lm_head = constrain(model.lm_head_kernel().astype(model.compute_dtype), (None, "vocab"))
    tokens = jnp.full((num_rows, num_new), pad, jnp.int32)
    logprobs = jnp.zeros((num_rows, num_new), jnp.float32)
    model_logprobs = jnp.zeros((num_rows, num_new), jnp.float32)
    done = jnp.zeros((num_rows,), bool)
    step = jnp.int32(0)
    rows, write, logits = None, None, first_logits

    for stage, size in enumerate(schedule):
        if stage:
            if rows is None:
                rows, write = jnp.arange(num_rows, dtype=jnp.int32), jnp.ones((num_rows,), bool)
            rows, write, logits = _compact(rows, write, logits, done, size, row_groups)
            logits = constrain(logits, ("batch", None))
        next_share = schedule[stage + 1] // row_groups if stage + 1 < len(schedule) else 0

        def active_of(done, rows, write):
            return ~done if rows is None else (write & ~done[rows])

        def cond(carry, next_share=next_share):
            step, _, _, _, _, done, _, rows, write = carry
            busiest = jnp.max(_group_counts(active_of(done, rows, write), row_groups))
            return (step < max_new_tokens) & (busiest > next_share)

        def body(carry):
            step, cache, tokens, logprobs, model_logprobs, done, logits, rows, write = carry
            drawn, lp, mlp = sample(step, logits, rows)
            finished = ~active_of(done, rows, write)
            tok = jnp.where(finished, pad, drawn)
            lp = jnp.where(finished, 0.0, lp)
            mlp = jnp.where(finished, 0.0, mlp)
            now_done = finished | masks.is_end_token(tok, eos)
            if rows is None:
                tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
                logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], step, axis=1)
                model_logprobs = jax.lax.dynamic_update_slice_in_dim(model_logprobs, mlp[:, None], step, axis=1)
                done = now_done
                position = next_position + step
            else:
                target = jnp.where(write, rows, num_rows)  # padding entries: out of range, dropped
                tokens = tokens.at[target, step].set(tok, mode="drop")
                logprobs = logprobs.at[target, step].set(lp, mode="drop")
                model_logprobs = model_logprobs.at[target, step].set(mlp, mode="drop")
                done = done.at[target].set(now_done, mode="drop")
                position = next_position[rows] + step
            # Feed the token back (its key/value to slot prompt_len + step); after the last token this forward is
            # not needed, one step per rollout. Padding entries feed their source row's draw, so they compute
            # exactly what that row computes (nothing new for the nucleus search to handle).
            fed = tok if write is None else jnp.where(write, tok, drawn)
            position = jnp.broadcast_to(position[None, :, None], (3, tok.shape[0], 1))
            logits, cache = model.decode_step(fed[:, None], position, cache, prompt_len + step, rows=rows,
                                              write=write, row_groups=row_groups, block_size=block_size,
                                              lm_head=lm_head)
            logits = constrain(logits.reshape(tok.shape[0], -1), ("batch", None))
            return step + 1, cache, tokens, logprobs, model_logprobs, done, logits, rows, write

        carry = (step, cache, tokens, logprobs, model_logprobs, done, logits, rows, write)
        step, cache, tokens, logprobs, model_logprobs, done, logits, rows, write = jax.lax.while_loop(
            cond, body, carry)
    return DecodeResult(tokens=tokens, logprobs=logprobs, model_logprobs=model_logprobs)
