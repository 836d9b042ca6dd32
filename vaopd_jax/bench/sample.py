"""Rollout sampler throughput: vaopd_jax's jitted sampler vs transformers' `generate`, same weights, same process.

    python -m vaopd_jax.bench.sample                      # ~50M-param config, 16 prompts x K=4, 256 new tokens
    python -m vaopd_jax.bench.sample --prompts 4 --samples 2 --new-tokens 64    # quicker
    python -m vaopd_jax.bench.sample --no-hf              # JAX only (+ XLA memory / cost analysis)

What is timed (after a warm-up call, so compilation is excluded and reported separately):
- prefill: the same call with max_new_tokens=1 (vision/prompt forward + the first token). The JAX run reuses
  the full run's compiled program (max_new_tokens is data), so only the loop trip count changes.
- decode: full call − prefill; decode tokens/s = rows × (new tokens − 1) / decode seconds.
Both sides sample (temperature 0.7, top-p 0.95: the paper's rollout setting) and are forced to produce exactly
`--new-tokens` tokens (JAX: no end ids; transformers: min_new_tokens). transformers gets left-padded prompts
(what its batched generate needs) and `num_return_sequences=K`, which prefills each prompt K times; the JAX
sampler prefills once and shares the cache. Prompts are text only (decode cost does not depend on images).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.rollout import sampler


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


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_jax(model, ids, mask, args):
    kw = dict(num_samples=args.samples, temperature=args.temperature, top_p=args.top_p, eos_token_ids=(), rng=0,
              min_new_bucket=args.new_tokens)

    def call(n_new):
        return jax.block_until_ready(sampler.generate(model, ids, mask, max_new_tokens=n_new, **kw))

    start = time.perf_counter()
    out = call(args.new_tokens)
    compile_s = time.perf_counter() - start
    assert int(np.asarray(out.lengths).min()) == args.new_tokens
    full = _timed(lambda: call(args.new_tokens), args.repeats)
    prefill = _timed(lambda: call(1), args.repeats)
    compiled = sampler.lower(model, ids, mask, max_new_tokens=args.new_tokens, **kw).compile()
    return dict(compile=compile_s, full=full, prefill=prefill, compiled=compiled, programs=sampler.compile_count())


def run_hf(hf, ids, mask, args):
    import torch

    rows = []
    lengths = mask.sum(1)
    width = int(lengths.max())
    left_ids = np.zeros((ids.shape[0], width), np.int64)
    left_mask = np.zeros((ids.shape[0], width), np.int64)
    for i, n in enumerate(lengths):  # transformers' batched generate needs LEFT padding
        left_ids[i, width - n:] = ids[i, :n]
        left_mask[i, width - n:] = 1
    inputs = dict(input_ids=torch.tensor(left_ids), attention_mask=torch.tensor(left_mask))

    def call(n_new):
        with torch.no_grad():
            return hf.generate(**inputs, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                               num_return_sequences=args.samples, max_new_tokens=n_new, min_new_tokens=n_new,
                               eos_token_id=1, pad_token_id=0, use_cache=True)

    torch.manual_seed(0)
    out = call(2)  # warm-up
    rows.append(out.shape[0])
    full = _timed(lambda: call(args.new_tokens), args.hf_repeats)
    prefill = _timed(lambda: call(1), args.hf_repeats)
    return dict(full=full, prefill=prefill)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="50m", help="50m | tiny")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="K rollouts per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (params and KV cache)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--no-hf", action="store_true", help="skip transformers (JAX figures only)")
    args = p.parse_args(argv)

    cfg = bench_config(args.config)
    dtype = jnp.dtype(args.dtype)
    if args.no_hf:
        model = qwen3_vl.Qwen3VL(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
        hf = None
    else:
        import torch

        from vaopd_jax.models.qwen3_vl import testing

        torch.set_num_threads(os.cpu_count() or 1)
        hf = testing.hf_reference_model(cfg, seed=0)
        model = testing.model_from_hf(hf, cfg, dtype=dtype)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    text_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.language_model, nnx.Param)))
    ids, mask = random_prompts(cfg, args.prompts, args.prompt_len)
    rows = args.prompts * args.samples
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, cpu threads {os.cpu_count()}")
    print(f"config {args.config}: {n_params / 1e6:.1f}M params ({text_params / 1e6:.1f}M text), dtype {args.dtype}; "
          f"{args.prompts} prompts x K={args.samples} = {rows} rows, prompt lengths "
          f"{int(mask.sum(1).min())}-{int(mask.sum(1).max())}, {args.new_tokens} new tokens, "
          f"temperature {args.temperature}, top-p {args.top_p}")

    j = run_jax(model, ids, mask, args)
    j_decode = j["full"] - j["prefill"]
    j_tps = rows * (args.new_tokens - 1) / j_decode
    print(f"JAX   compile+first run {j['compile']:.2f}s ({j['programs']} program(s) compiled)")
    print(f"JAX   prefill {j['prefill'] * 1e3:.1f} ms ({args.prompts} prompts, once each) | decode "
          f"{j_decode:.3f}s -> {j_tps:,.0f} tokens/s | total {j['full']:.3f}s")
    mem = j["compiled"].memory_analysis()
    if mem is not None:
        print(f"XLA   memory: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs "
              f"{mem.output_size_in_bytes / 2**20:.2f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")
    cost = j["compiled"].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        print(f"XLA   cost analysis: {cost['flops'] / 1e9:.2f} GFLOP, {cost.get('bytes accessed', 0) / 2**30:.2f} "
              "GiB accessed (while-loop body counted once)")

    if hf is not None:
        h = run_hf(hf, ids, mask, args)
        h_decode = h["full"] - h["prefill"]
        h_tps = rows * (args.new_tokens - 1) / h_decode
        print(f"HF    prefill {h['prefill'] * 1e3:.1f} ms ({rows} rows: prompts repeated K times) | decode "
              f"{h_decode:.3f}s -> {h_tps:,.0f} tokens/s | total {h['full']:.3f}s")
        print(f"ratio JAX / transformers: decode tokens/s {j_tps / h_tps:.2f}x, prefill "
              f"{h['prefill'] / j['prefill']:.2f}x, end to end {h['full'] / j['full']:.2f}x")


if __name__ == "__main__":
    main()
