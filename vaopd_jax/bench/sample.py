"""Rollout sampler benchmark: vaopd_jax's jitted sampler vs transformers' `generate`, same weights, same prompts,
same sampling settings, same process; plus compile times, a long-tail batch and the paper-scale memory.

    python -m vaopd_jax.bench.sample                    # everything below, one run (README's sampler rows)
    python -m vaopd_jax.bench.sample --part speed --lengths 64 --prompts 4    # quicker
    python -m vaopd_jax.bench.sample --part aot         # paper-scale memory only (8 simulated devices)

Parts (`--part`, comma list; default all):
- speed: for each of `--lengths` new tokens (default 64, 256, 1,024): JAX decode tokens/s against
  transformers' decode tokens/s and their ratio, and JAX's own tokens/s relative to its figure at the first
  length. The lengths and the two sides run interleaved, round by round (best of --repeats), so a change in
  the machine's load hits all of them. Both sides sample (temperature 0.7, top-p 0.95: the paper's rollout
  setting) and are forced to produce exactly that many tokens (JAX: no end ids; transformers:
  min_new_tokens). transformers gets left-padded prompts (what its batched generate needs) and
  `num_return_sequences=K`, which prefills each prompt K times; the JAX sampler prefills once and shares the
  cache. Prompts are text only (decode cost does not depend on images). Timing: decode = full call - prefill
  call (the same call with max_new_tokens=1; the JAX run reuses the compiled program, max_new_tokens is data);
  decode tokens/s = rows x (new tokens - 1) / decode seconds.
- compile: the JAX program for each of `--lengths` and `--compile-lengths` (default also 4,096): trace and XLA
  compile seconds, measured apart from the first run (which runs the compiled executable), and XLA's memory
  analysis.
- tail: `--tail-prompts` prompts x K rollouts of up to `--tail-max` tokens whose lengths are spread like real
  rollouts (most short, a long tail to the limit): `--tail-end-ids` random token ids end a response, so each
  step ends a row with a small fixed probability (geometric lengths, ~8 % of rows at the limit; the model is the
  bench config with an untied random LM head, `tail_model`, since the tied random one repeats one token). The
  same call with row compaction (the default) and without (decode_stages=1) gives the same tokens; prints both
  decode times and the rows computed over all steps (JAX only: transformers' draws would give other lengths).
- aot: the rollout program at paper scale (2B student, fp32 params / bf16 compute, 16 prompts x 4 samples,
  1,024-token prompts holding one 768-token image, 4,096 new tokens) lowered from abstract shapes (no
  weights) on a simulated 8-device fsdp mesh; XLA's per-device memory analysis. Runs in a subprocess (it
  needs 8 CPU devices, which would change the speed parts' device).

The machine's load (`uptime`) is printed at the start and the end: figures from a loaded machine are
pessimistic; ratios are taken side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.parallel import targets as _targets  # noqa: F401  (sets the CUDA plugin's env before JAX starts)
from vaopd_jax.parallel.mesh import on_mesh
from vaopd_jax.rollout import sampler

GB = 1e9


def bench_config(name: str) -> qwen3_vl.Qwen3VLConfig:
    """'50m': 8 layers x 512 wide, 32k vocab, tied embeddings (~42M text params); 'tiny': the test config."""
    if name == "tiny":
        return qwen3_vl.Qwen3VLConfig.tiny()
    if name == "50m":
        return qwen3_vl.Qwen3VLConfig.tiny(
            text=dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, mrope_section=(12, 10, 10),
                      rope_theta=1_000_000.0),
            vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, deepstack_visual_indexes=(0,)),
            image_token_id=32000, video_token_id=32001, vision_start_token_id=32002, vision_end_token_id=32003,
            tie_word_embeddings=True)
    raise ValueError(f"--config must be '50m' or 'tiny'; got {name!r}")


def random_prompts(cfg, num_prompts: int, prompt_len: int, seed: int = 0):
    """Right-padded random text prompts with lengths in [prompt_len/2, prompt_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, num_prompts)
    ids = np.zeros((num_prompts, prompt_len), np.int32)
    mask = np.zeros((num_prompts, prompt_len), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, min(cfg.image_token_id, cfg.text.vocab_size), n)
        mask[i, :n] = 1
    return ids, mask


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ----------------------------------------------------------------------------- JAX side
class JaxProgram:
    """One compiled sampler program (one new-token bucket), with its compile time measured apart from runs."""

    def __init__(self, model, ids, mask, n_new: int, rng=0, **settings):
        # max_length: the 50m config's 4,096 positions would refuse a 4,096-token rollout after a prompt (RoPE
        # itself has no limit).
        self.settings = dict(settings, min_new_bucket=n_new, max_length=ids.shape[1] + n_new)
        self.prompts = sampler.batch_lib.from_flat(ids, mask, None, None, model.config,
                                                   prompt_len=sampler.bucket_size(int(mask.sum(1).max())))
        self.rng = rng
        start = time.perf_counter()
        rollouts, self.params = sampler.Sampler.for_model(model, max_new_tokens=n_new, **self.settings)
        self.model = model
        lowered = rollouts.lower(self.params, self.prompts, rng)
        self.trace_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.program = rollouts.program

    def __call__(self, n_new: int):
        """Runs the compiled program for n_new (<= its bucket) tokens; returns the SamplerOutput (blocked on)."""
        rollouts = sampler.Sampler(self.model, max_new_tokens=n_new, **self.settings)
        assert rollouts.program == self.program, "the benchmark must reuse the compiled program"
        return jax.block_until_ready(self.compiled(*rollouts._arguments(self.params, self.prompts, self.rng)))

    def memory(self) -> str:
        mem = self.compiled.memory_analysis()
        if mem is None:
            return "memory analysis unavailable"
        return (f"arguments {mem.argument_size_in_bytes / 2**20:.0f} MiB, temp {mem.temp_size_in_bytes / 2**20:.0f} "
                f"MiB, outputs {mem.output_size_in_bytes / 2**20:.1f} MiB")


def _hf_inputs(ids, mask):
    import torch

    lengths = mask.sum(1)
    width = int(lengths.max())
    left_ids = np.zeros((ids.shape[0], width), np.int64)
    left_mask = np.zeros((ids.shape[0], width), np.int64)
    for i, n in enumerate(lengths):  # transformers' batched generate needs LEFT padding
        left_ids[i, width - n:] = ids[i, :n]
        left_mask[i, width - n:] = 1
    return dict(input_ids=torch.tensor(left_ids), attention_mask=torch.tensor(left_mask))


def hf_generate(hf, ids, mask, args, n_new: int, *, forced: bool, eos=None):
    """transformers' generate with the benchmark's sampling settings; returns the generated ids (rows, <= n_new)."""
    import torch

    inputs = _hf_inputs(ids, mask)
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                          num_return_sequences=args.samples, max_new_tokens=n_new,
                          min_new_tokens=n_new if forced else 0,
                          eos_token_id=list(eos) if eos is not None else 1, pad_token_id=0, use_cache=True)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


# ----------------------------------------------------------------------------- parts
def part_speed_and_compile(model, hf, cfg, args, parts):
    ids, mask = random_prompts(cfg, args.prompts, args.prompt_len)
    rows = args.prompts * args.samples
    kw = dict(num_samples=args.samples, temperature=args.temperature, top_p=args.top_p, eos_token_ids=())
    lengths = [int(x) for x in args.lengths.split(",") if x]
    compile_only = [int(x) for x in args.compile_lengths.split(",") if x and int(x) not in lengths]
    print(f"== compile: one program per new-token bucket ({rows} rows, prompt bucket "
          f"{sampler.bucket_size(int(mask.sum(1).max()))}), traced and compiled apart from any run", flush=True)
    programs = {}
    for n_new in lengths + compile_only:
        prog = JaxProgram(model, ids, mask, n_new, **kw)
        print(f"  {n_new:5d} new tokens: trace {prog.trace_s:5.1f} s + XLA compile {prog.compile_s:5.1f} s = "
              f"{prog.trace_s + prog.compile_s:5.1f} s; XLA: {prog.memory()}", flush=True)
        if n_new in lengths:
            programs[n_new] = prog
    if "speed" not in parts:
        return
    print(f"== speed: {args.prompts} prompts x K={args.samples} = {rows} rows, prompt lengths "
          f"{int(mask.sum(1).min())}-{int(mask.sum(1).max())}, temperature {args.temperature}, top-p {args.top_p}, "
          f"every row forced to the full length; best of {args.repeats} (JAX) / {args.hf_repeats} (transformers), "
          "the lengths and the two sides interleaved", flush=True)
    for n_new, prog in programs.items():
        start = time.perf_counter()
        out = prog(n_new)
        first = time.perf_counter() - start
        assert int(np.asarray(out.lengths).min()) == n_new
        print(f"  {n_new:5d} new tokens: JAX first run of the compiled program {first:.2f} s", flush=True)
    if hf is not None:
        import torch

        torch.manual_seed(0)
        hf_generate(hf, ids, mask, args, 2, forced=True)  # warm-up
    best = {}
    for round_ in range(max(args.repeats, args.hf_repeats if hf is not None else 0)):
        for n_new, prog in programs.items():
            timings = best.setdefault(n_new, {})
            if round_ < args.repeats:
                for name, n in (("jax_full", n_new), ("jax_prefill", 1)):
                    timings[name] = min(timings.get(name, float("inf")), _best(lambda: prog(n), 1))
            if hf is not None and round_ < args.hf_repeats:
                for name, n in (("hf_full", n_new), ("hf_prefill", 1)):
                    timings[name] = min(timings.get(name, float("inf")),
                                        _best(lambda: hf_generate(hf, ids, mask, args, n, forced=True), 1))
            print(f"  round {round_ + 1}, {n_new} new tokens: " + ", ".join(
                f"{k} {v:.2f} s" for k, v in timings.items()), flush=True)
    first_length = lengths[0]
    tps = {n: {side: rows * (n - 1) / max(t[f"{side}_full"] - t[f"{side}_prefill"], 1e-9)
               for side in ("jax", "hf") if f"{side}_full" in t} for n, t in best.items()}
    print(f"new tok | JAX decode tok/s | vs own @{first_length} | transformers decode tok/s | JAX/transformers")
    for n_new in lengths:
        j, h = tps[n_new]["jax"], tps[n_new].get("hf")
        hf_cols = f"{h:25,.0f} | {j / h:15.2f}x" if h else f"{'-':>25} | {'-':>16}"
        print(f"{n_new:7d} | {j:16,.0f} | {j / tps[first_length]['jax']:10.2f}x | {hf_cols}", flush=True)


def _row_steps(lengths, max_new: int, schedule) -> int:
    """Rows computed over all decode steps for these response lengths under a stage schedule (one group)."""
    step, total = 0, 0
    active_at = lambda t: int(np.sum(np.asarray(lengths) > t))  # noqa: E731 (row still decoding at step t)
    for stage, size in enumerate(schedule):
        nxt = schedule[stage + 1] if stage + 1 < len(schedule) else 0
        while step < max_new and active_at(step) > nxt:
            total += size
            step += 1
    return total


def tail_model(cfg, dtype, logit_std: float = 2.0):
    """The benchmark config with an untied random LM head scaled to logits of std ~logit_std: a random model
    with tied embeddings repeats its input token forever, while this one draws varied tokens from a peaked
    distribution (a nucleus of a few tokens, as a trained model's), so random end ids end rows at random steps."""
    cfg = cfg.replace(tie_word_embeddings=False)
    model = qwen3_vl.Qwen3VL(cfg, param_dtype=dtype, rngs=nnx.Rngs(1))
    # Final hidden states have unit RMS per feature: a logit is a sum of hidden_size terms.
    scale = logit_std / (float(jnp.std(model.lm_head[...])) * cfg.text.hidden_size ** 0.5)
    model.lm_head[...] = model.lm_head[...] * scale
    return model


def part_tail(cfg, args):
    from vaopd_jax.rollout import decode

    model = tail_model(cfg, jnp.dtype(args.dtype))
    ids, mask = random_prompts(cfg, args.tail_prompts, args.prompt_len, seed=1)
    rows = args.tail_prompts * args.samples
    n_new = args.tail_max
    vocab = min(cfg.image_token_id, cfg.text.vocab_size)
    # Each step ends a row with probability ~ends / vocab: geometric lengths, about 8 % of rows reach the limit.
    num_ends = args.tail_end_ids or max(1, round(-np.log(0.08) * vocab / n_new))
    eos = tuple(int(i) for i in np.random.default_rng(7).choice(vocab, num_ends, replace=False))
    kw = dict(num_samples=args.samples, temperature=args.temperature, top_p=args.top_p, eos_token_ids=eos, rng=3)
    print(f"== long tail: {args.tail_prompts} prompts x K={args.samples} = {rows} rows, up to {n_new} new tokens, "
          f"{len(eos)} random end ids (each step ends a row with probability ~{len(eos) / vocab:.4f}); the bench "
          f"config with an untied LM head (`tail_model`), temperature {args.temperature}, top-p {args.top_p}",
          flush=True)
    def run(stages):  # one program at a time (freed on return): output, (full s, prefill s, compile s)
        prog = JaxProgram(model, ids, mask, n_new, decode_stages=stages, **kw)
        out = prog(n_new)
        full = _best(lambda: prog(n_new), args.repeats)
        prefill = _best(lambda: prog(1), args.repeats)
        return out, (full, prefill, prog.compile_s + prog.trace_s)

    timings, outputs = {}, {}
    for stages, name in ((decode.MAX_STAGES, "compacted"), (1, "all rows")):
        outputs[name], timings[name] = run(stages)
    a, b = outputs["compacted"], outputs["all rows"]
    same = bool(np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)))
    lengths = np.asarray(a.lengths)
    useful = int(lengths.sum())
    q = np.percentile(lengths, [10, 50, 90]).astype(int)
    schedule = decode.compaction_schedule(rows)
    print(f"  JAX response lengths: p10 {q[0]}, median {q[1]}, p90 {q[2]}, max {lengths.max()}, "
          f"{int((lengths == n_new).sum())} of {rows} at the limit; {useful} tokens; same tokens with and without "
          f"compaction: {same}")
    for name, stages in (("compacted", schedule), ("all rows", (rows,))):
        full, prefill, comp = timings[name]
        decode_s = full - prefill
        print(f"  JAX {name:9s} (buckets {stages}): decode {decode_s:7.2f} s -> {useful / decode_s:8,.0f} "
              f"generated tok/s; rows computed over all steps {_row_steps(lengths, n_new, stages):,}; "
              f"compile {comp:.1f} s")
    ratio = (timings["all rows"][0] - timings["all rows"][1]) / (timings["compacted"][0] - timings["compacted"][1])
    print(f"  compaction speed-up on this batch: {ratio:.2f}x")


def part_aot(args):
    """The paper-scale rollout programs for --target; the cpu target runs in a subprocess with 8 simulated CPU
    devices (the speed parts use one)."""
    if args.target != "cpu":
        from vaopd_jax.parallel import targets as targets_lib

        try:
            targets_lib.devices(targets_lib.get(args.target).name)
        except (ValueError, targets_lib.MissingExtra) as e:
            raise SystemExit(str(e))
        aot_report(target=args.target, programs=args.programs, student=args.aot_student, dtype=args.aot_dtype)
        return
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--part", "aot-here", "--programs", args.programs,
           "--aot-student", args.aot_student, "--aot-dtype", args.aot_dtype]
    subprocess.run(cmd, env=env, check=True)


AOT_PROGRAMS = ("rollout", "prefill", "decode", "eval")
# The evaluator's generation (configs/eval_default.py): batch_size 8 prompts x num_samples 8, temperature 1.0,
# top-p 1.0, 4,096 new tokens, bf16 weights, prompts padded to >= 256 (here 1,024 with a 768-token image), the
# mesh data=-1 (weights replicated, prompts split over the devices: vaopd_jax.evaluate.local_mesh).
EVAL_SETTINGS = dict(num_prompts=8, num_samples=8, temperature=1.0, top_p=1.0, max_new_tokens=4096)


def _abstract_prompts(cfg, mesh, num_prompts, prompt_len, image_tokens):
    from vaopd_jax.bench import aot

    sds = lambda shape, dtype, axes=None: aot.sds(mesh, shape, dtype, axes)  # noqa: E731
    patches = image_tokens * cfg.vision.merge_unit  # one image per prompt
    vision = qwen3_vl.VisionInputs(
        rotary_pos=sds((num_prompts, patches, 2), jnp.int32, ("batch", None, None)),
        interp_indices=sds((num_prompts, patches, 4), jnp.int32, ("batch", None, None)),
        interp_weights=sds((num_prompts, patches, 4), jnp.float32, ("batch", None, None)),
        segment_ids=sds((num_prompts, patches), jnp.int32, ("batch", None)),
        valid=sds((num_prompts, patches), jnp.bool_, ("batch", None)),
        merged_valid=sds((num_prompts, image_tokens), jnp.bool_, ("batch", None)))
    return dict(input_ids=sds((num_prompts, prompt_len), jnp.int32, ("batch", None)),
                attention_mask=sds((num_prompts, prompt_len), jnp.int32, ("batch", None)),
                position_ids=sds((3, num_prompts, prompt_len), jnp.int32, (None, "batch", None)),
                next_position=sds((num_prompts,), jnp.int32, ("batch",)),
                pixel_values=sds((num_prompts, patches, cfg.vision.patch_dim), jnp.float32, ("batch", None, None)),
                vision_inputs=vision, image_rows=sds((num_prompts * image_tokens,), jnp.int32))


def rollout_lowerings(cfg, mesh, *, param_dtype=jnp.float32, num_prompts=16, num_samples=4, prompt_len=1024,
                      image_tokens=768, max_new_tokens=4096, temperature=0.7, top_p=0.95, valid_vocab=151_669,
                      context=None, decode_block=None):
    """{name: closure lowering it} for the rollout's programs from abstract shapes over `mesh`:
    'rollout' the sampler's whole program (vision, prefill, the decode loop: what the trainer runs; a compiler's
    FLOPs / bytes for it count each loop body once);
    'prefill' its first part (vision tower, the prompts into a KV cache of prompt + new slots, copied to the K
    samples); 'decode' one decode step of all rows (the loop body: the step's forward over a cache filled to
    `context` slots, default prompt + half the new tokens, and the sampling), the cache donated, its layer scan
    unrolled so that the compiler's byte count covers every layer.
    decode_block: cache slots per attention block of 'decode' (default: the whole context in one block, so the
    compiler's byte count covers every slot it reads; the sampler reads blocks of 128 in a loop)."""
    from vaopd_jax.bench import aot
    from vaopd_jax.models.qwen3_vl import sharding as model_sharding  # noqa: F401
    from vaopd_jax.rollout import decode as decode_lib
    from vaopd_jax.rollout import logits as logit_ops

    graphdef, params = aot.abstract_model(cfg, param_dtype, jnp.bfloat16, None, mesh)
    model = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, param_dtype=param_dtype, compute_dtype=jnp.bfloat16,
                                                    rngs=nnx.Rngs(0)))
    prompts = _abstract_prompts(cfg, mesh, num_prompts, prompt_len, image_tokens)
    sds = lambda shape, dtype, axes=None: aot.sds(mesh, shape, dtype, axes)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    vocab = cfg.text.vocab_size
    eos = [i for i in sampler.END_TOKEN_IDS if i < vocab] or [vocab - 1]  # tiny test configs: any id
    rollouts = sampler.Sampler(model, max_new_tokens=max_new_tokens, num_samples=num_samples, eos_token_ids=eos,
                               temperature=temperature, top_p=top_p, valid_vocab_size=valid_vocab, mesh=mesh)
    rows, slots = num_prompts * num_samples, prompt_len + sampler.bucket_size(max_new_tokens)
    p = prompts

    def lower_rollout():
        args = (params, p["input_ids"], p["attention_mask"], p["position_ids"], p["next_position"],
                p["pixel_values"], p["vision_inputs"], p["image_rows"], sds((), jnp.int32),
                jax.ShapeDtypeStruct(key.shape, key.dtype), sds((8,), jnp.int32), sds((), jnp.int32),
                sds((), jnp.int32), sds((8,), jnp.int32))
        # The Sampler's own jitted program and mesh context (jax.set_mesh, as for the train step).
        return rollouts._run.lower(*args, program=rollouts.program)

    def prefill(params, input_ids, attention_mask, position_ids, pixel_values, vision_inputs, image_rows):
        m = nnx.merge(graphdef, params)
        embeds, deepstack = m.encode_prompt_images(pixel_values, vision_inputs, image_rows)
        cache = sampler._constrain_cache(m.init_cache(num_prompts, slots, jnp.bfloat16), mesh)
        logits, cache = m.prefill(input_ids, attention_mask, position_ids, cache=cache, image_embeds=embeds,
                                  deepstack_embeds=deepstack, last_only=True)
        cache = sampler._constrain_cache(sampler.repeat_cache(cache, num_samples), mesh)
        return sampler._constrain(jnp.repeat(logits, num_samples, axis=0), mesh, ("batch", None)), cache

    def lower_prefill():
        fn = on_mesh(jax.jit(prefill), mesh)
        return fn.lower(params, p["input_ids"], p["attention_mask"], p["position_ids"], p["pixel_values"],
                        p["vision_inputs"], p["image_rows"])

    filled = prompt_len + max_new_tokens // 2 if context is None else int(context)
    t = cfg.text
    sampling = logit_ops.SamplingParams(temperature=temperature, top_p=top_p)
    block = filled if decode_block is None else int(decode_block)
    # Only the slots the step reads: a cache of `filled` slots (the step at that context; the rollout's cache
    # is larger, its unread slots cost no bandwidth).
    cache_slots = filled + 1

    def decode_step(params, cache, tokens, positions, cache_index, uniform):
        m = nnx.merge(graphdef, params)
        lm_head = sampler._constrain(m.lm_head_kernel().astype(m.compute_dtype), mesh, (None, "vocab"))
        logits, cache = m.decode_step(tokens[:, None], positions, cache, cache_index, block_size=block,
                                      lm_head=lm_head)
        logits = sampler._constrain(logits.reshape(rows, -1), mesh, ("batch", None))
        drawn, lp, _ = logit_ops.sample_tokens(None, logits, sampling, valid_vocab, uniform=uniform)
        return drawn, lp, sampler._constrain_cache(cache, mesh)

    def lower_decode():
        kv_axes = ("layers", "batch", "kv_heads", None, "head_dim")
        shape = (t.num_hidden_layers, rows, t.num_key_value_heads, cache_slots, t.head_dim)
        cache = qwen3_vl.KVCache(k=sds(shape, jnp.bfloat16, kv_axes), v=sds(shape, jnp.bfloat16, kv_axes),
                                 valid=sds((rows, cache_slots), jnp.bool_, ("batch", None)))
        fn = on_mesh(jax.jit(decode_step, donate_argnums=(1,)), mesh)
        with aot.unrolled_scans():  # the compiler's byte count then covers every layer, not one
            return fn.lower(params, cache, sds((rows,), jnp.int32, ("batch",)),
                            sds((3, rows, 1), jnp.int32, (None, "batch", None)), sds((), jnp.int32),
                            sds((rows,), jnp.float32, ("batch",)))

    del decode_lib
    return {"rollout": lower_rollout, "prefill": lower_prefill, "decode": lower_decode}, dict(
        rows=rows, slots=slots, context=filled, num_prompts=num_prompts)


def decode_roofline_bytes(cfg, rows: int, context: int, mesh) -> float:
    """The least one decode step must read per device: the rows are split over the batch axes, so every device
    multiplies its rows by every weight matrix and reads all of them once at the compute dtype (bf16; split
    only by a 'tensor' axis), plus its rows' share of the bf16 KV cache up to `context` slots."""
    from vaopd_jax.bench import device as device_bench

    weights, kv = device_bench.decode_bytes_per_step(cfg, rows, context, weight_bytes=2, cache_bytes=2)
    return weights / mesh.shape.get("tensor", 1) + kv / mesh.size


def aot_report(target="cpu", programs="rollout", student="2b", dtype="float32", *, num_prompts=16, num_samples=4,
               prompt_len=1024, image_tokens=768, max_new_tokens=4096, mesh_shape=None, quiet=False):
    """The paper-scale rollout programs (`AOT_PROGRAMS`, comma list) from abstract shapes, compiled for
    `target` (parallel/targets.py; 'cpu' needs >= 8 simulated devices); one `... peak <X> GB ...` line per
    program. 'eval' is the evaluator's generation (EVAL_SETTINGS, bf16 weights, data-parallel mesh). Returns
    {program: ProgramMemory}."""
    from vaopd_jax.bench import aot
    from vaopd_jax.bench import device as device_bench
    from vaopd_jax.parallel import targets as targets_lib

    target = targets_lib.get(target) if isinstance(target, str) else target
    names = [x.strip() for x in programs.split(",") if x.strip()] if isinstance(programs, str) else list(programs)
    unknown = set(names) - set(AOT_PROGRAMS)
    if unknown:
        raise SystemExit(f"--programs: unknown {sorted(unknown)}; choose from {', '.join(AOT_PROGRAMS)}")
    presets = {"2b": qwen3_vl.Qwen3VLConfig.qwen3_vl_2b, "4b": qwen3_vl.Qwen3VLConfig.qwen3_vl_4b,
               "8b": qwen3_vl.Qwen3VLConfig.qwen3_vl_8b}
    cfg = presets[student](attention_impl="chunked")
    fsdp = targets_lib.make_mesh(target, fsdp=-1) if mesh_shape is None else targets_lib.make_mesh(
        target, data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    results = {}
    train_names = [n for n in names if n != "eval"]
    if train_names:
        lowerings, shape = rollout_lowerings(cfg, fsdp, param_dtype=jnp.dtype(dtype), num_prompts=num_prompts,
                                             num_samples=num_samples, prompt_len=prompt_len,
                                             image_tokens=image_tokens, max_new_tokens=max_new_tokens)
        print(f"== aot: {student.upper()} student rollout programs ({dtype} params, bf16 compute and KV cache), "
              f"{num_prompts} prompts x {num_samples} samples, prompt {prompt_len} ({image_tokens} image tokens) + "
              f"{max_new_tokens} new tokens, target {target.label}, mesh {_mesh_desc(fsdp)}", flush=True)
        for name in train_names:
            mem, *_ = aot.compile_program(name if name != "decode" else f"decode step at context {shape['context']}",
                                          lowerings[name], target, quiet=quiet)
            results[name] = mem
            if name == "decode" and target.hbm_bandwidth:
                least = decode_roofline_bytes(cfg, shape["rows"], shape["context"], fsdp)
                print(f"    decode roofline: the least bytes per device a step reads {least / GB:.3f} GB -> "
                      f"{least / target.hbm_bandwidth * 1e3:.2f} ms at {target.hbm_bandwidth / GB:,.0f} GB/s"
                      + (f"; the compiler's bytes accessed {mem.bytes_accessed / GB:.3f} GB -> "
                         f"{mem.bytes_accessed / target.hbm_bandwidth * 1e3:.2f} ms: {least / mem.bytes_accessed:.0%} "
                         f"of the roofline" if mem.bytes_accessed else "; the compiler reports no byte count"),
                      flush=True)
        t = cfg.text
        cache = 2 * t.num_hidden_layers * shape["rows"] * t.num_key_value_heads * shape["slots"] * t.head_dim * 2
        print(f"    (the bf16 KV cache of the rollout: {cache / GB:.1f} GB in all, {cache / GB / fsdp.size:.2f} GB per "
              "device)")
        del device_bench
    if "eval" in names:
        data = targets_lib.make_mesh(target, data=-1, fsdp=1)
        settings = dict(EVAL_SETTINGS)
        lowerings, _ = rollout_lowerings(cfg, data, param_dtype=jnp.bfloat16, prompt_len=prompt_len,
                                         image_tokens=image_tokens, **settings)
        print(f"== aot: the evaluator's generation ({student.upper()} bf16, {settings['num_prompts']} prompts x "
              f"{settings['num_samples']} samples, temperature {settings['temperature']}, top-p {settings['top_p']}, "
              f"prompt {prompt_len} + {settings['max_new_tokens']} new tokens), target {target.label}, mesh "
              f"{_mesh_desc(data)}", flush=True)
        results["eval"], *_ = aot.compile_program("eval generation", lowerings["rollout"], target, quiet=quiet)
    return results


def _mesh_desc(mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="speed,compile,tail,aot", help="comma list of speed, compile, tail, aot")
    p.add_argument("--config", default="50m", help="50m | tiny")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="K rollouts per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--lengths", default="64,256,1024", help="new-token lengths timed against transformers")
    p.add_argument("--compile-lengths", default="4096", help="further lengths whose program is only compiled")
    p.add_argument("--tail-prompts", type=int, default=16)
    p.add_argument("--tail-max", type=int, default=1024, help="max new tokens of the long-tail batch")
    p.add_argument("--tail-end-ids", type=int, default=0,
                   help="number of random end ids (sets the length spread; 0: ~8%% of rows reach --tail-max)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (params and KV cache)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--no-hf", action="store_true", help="skip transformers (JAX figures only)")
    p.add_argument("--target", default="cpu", help="aot: compile for this target (vaopd_jax/parallel/targets.py: "
                   "h100x8, a100x8, v5p-8, v6e-8, v5e-8, cpu, ...)")
    p.add_argument("--programs", default="rollout,prefill,decode,eval",
                   help=f"aot: comma list of {', '.join(AOT_PROGRAMS)}")
    p.add_argument("--aot-student", default="2b", help="aot: the sampling model (2b | 4b | 8b)")
    p.add_argument("--aot-dtype", default="float32", help="aot: the sampler's parameter dtype (the train state's "
                   "fp32 master params: float32; bfloat16)")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.part.split(",") if x.strip()}
    if parts == {"aot-here"}:  # the subprocess of part_aot
        aot_report(target="cpu", programs=args.programs, student=args.aot_student, dtype=args.aot_dtype)
        return
    unknown = parts - {"speed", "compile", "tail", "aot"}
    if unknown:
        raise SystemExit(f"--part: unknown {sorted(unknown)}; choose from speed, compile, tail, aot")
    print(f"load at start: {_uptime()}")
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, cpu threads {os.cpu_count()}, JAX "
          f"{jax.__version__}", flush=True)

    if parts & {"speed", "compile", "tail"}:
        from vaopd_jax.rollout import decode

        cfg = bench_config(args.config)
        dtype = jnp.dtype(args.dtype)
        hf = None
        if args.no_hf or "speed" not in parts:
            model = qwen3_vl.Qwen3VL(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
        else:
            import torch

            from vaopd_jax.models.qwen3_vl import testing

            torch.set_num_threads(os.cpu_count() or 1)
            hf = testing.hf_reference_model(cfg, seed=0)
            model = testing.model_from_hf(hf, cfg, dtype=dtype)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        text_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.language_model, nnx.Param)))
        print(f"config {args.config}: {n_params / 1e6:.1f}M params ({text_params / 1e6:.1f}M text), dtype "
              f"{args.dtype}; decode attention block {decode.BLOCK_SIZE} slots, row buckets shrink "
              f"{decode.SHRINK_FACTOR}x (at most {decode.MAX_STAGES} stages)", flush=True)
        if parts & {"speed", "compile"}:
            part_speed_and_compile(model, hf, cfg, args, parts)
        if "tail" in parts:
            part_tail(cfg, args)
    if "aot" in parts:
        part_aot(args)
    print(f"load at end: {_uptime()}")


if __name__ == "__main__":
    main()
