"""Prefill (forward) throughput: the jitted Flax Qwen3-VL vs transformers' eager forward, same weights, same
inputs, same process.

    python -m vaopd_jax.bench.forward                          # ~50M-param config, CPU, fp32, vs transformers
    python -m vaopd_jax.bench.forward --batch 1 --seq 256      # quicker
    python -m vaopd_jax.bench.forward --config 2b --dtype bfloat16 --no-hf     # on a GPU: random 2B model
    python -m vaopd_jax.bench.forward --config moe             # mixture-of-experts decoder vs transformers' MoE

Inputs: `--batch` right-padded prompts of `--seq` tokens, each holding one image of `--image` x `--image`
patches (vision tower included in the timed forward). Timing: best of `--repeats` calls after a warm-up
(compilation reported separately); JAX and transformers calls are interleaved so machine load hits both.
Prints tokens/s for each and their ratio, the largest logit difference between the two, plus XLA's compiled cost
analysis (flops, bytes accessed) and memory analysis (argument / output / temp bytes) of the jitted forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing


def bench_config(name: str) -> qwen3_vl.Qwen3VLConfig:
    """'50m': 8 text layers x 512 wide, 16k vocab, untied (~50M params with the 4-block vision tower);
    'moe': the same with a mixture-of-experts decoder shaped like Qwen3-VL-30B-A3B's (every layer sparse, top-8
    of 64 experts of width 256, renormalised; ~220M params, ~60M active per token);
    '2b' / '8b' / '30b-a3b': the real sizes (random weights); 'tiny': the test config."""
    if name == "tiny":
        return qwen3_vl.Qwen3VLConfig.tiny()
    if name == "moe":
        base = bench_config("50m")
        return base.replace(text=dataclasses.replace(base.text, num_experts=64, num_experts_per_tok=8,
                                                     moe_intermediate_size=256, norm_topk_prob=True))
    if name == "50m":
        return qwen3_vl.Qwen3VLConfig.tiny(
            text=dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, mrope_section=(12, 10, 10),
                      rope_theta=1_000_000.0),
            vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, num_position_embeddings=256,
                        deepstack_visual_indexes=(1, 2)),
            image_token_id=16000, video_token_id=16001, vision_start_token_id=16002, vision_end_token_id=16003,
            tie_word_embeddings=False)
    if name == "2b":
        return qwen3_vl.Qwen3VLConfig.qwen3_vl_2b()
    if name == "8b":
        return qwen3_vl.Qwen3VLConfig.qwen3_vl_8b()
    if name == "30b-a3b":
        return qwen3_vl.Qwen3VLConfig.qwen3_vl_30b_a3b()
    raise ValueError(f"--config must be one of tiny/50m/moe/2b/8b/30b-a3b; got {name!r}")


def make_inputs(cfg, batch: int, seq: int, image: int, seed: int = 0):
    """`batch` prompts of exactly `seq` tokens (the last one shortened by 8 for right padding), one image each."""
    n_img_tokens = image * image // cfg.vision.merge_unit
    text = max(seq - n_img_tokens - 2, 2)
    b = testing.make_batch(cfg, [[(1, image, image)]] * batch, [text // 2] * batch, seed=seed, pad_to=seq)
    if batch > 1:  # right padding in the last row
        last = b.attention_mask[-1].sum()
        b.attention_mask[-1, last - 8:] = 0
        b.input_ids[-1, last - 8:] = 0
    return b


def count_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="50m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--image", type=int, default=16, help="image side in patches (16 -> 64 image tokens)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = ap.parse_args(argv)

    cfg = bench_config(args.config)
    dtype = jnp.dtype(args.dtype)
    b = make_inputs(cfg, args.batch, args.seq, args.image)
    hf = None
    if args.no_hf:
        model = qwen3_vl.Qwen3VL(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
    else:
        import torch

        hf = testing.hf_reference_model(cfg, seed=0)
        if dtype == jnp.bfloat16:
            hf = hf.to(torch.bfloat16)
        hf.config._attn_implementation = "eager"
        model = testing.model_from_hf(hf, cfg, dtype=dtype)
    n_params = count_params(model)

    pos, _ = qwen3_vl.get_rope_index(b.input_ids, b.image_grid_thw, b.attention_mask, cfg)
    vi = qwen3_vl.prepare_vision_inputs(b.image_grid_thw, cfg)
    graphdef, state = nnx.split(model)

    def forward(state, ids, mask, pos, pixels, vi):
        return nnx.merge(graphdef, state)(ids, mask, pixels, position_ids=pos, vision_inputs=vi)

    jit_args = (state, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), jnp.asarray(pos),
                jnp.asarray(b.pixel_values, dtype), jax.tree.map(jnp.asarray, vi))
    t0 = time.perf_counter()
    lowered = jax.jit(forward).lower(*jit_args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return compiled(*jit_args).block_until_ready()

    def run_hf():
        import torch

        with torch.no_grad():
            return hf(input_ids=torch.tensor(b.input_ids, dtype=torch.long),
               attention_mask=torch.tensor(b.attention_mask, dtype=torch.long),
               pixel_values=torch.tensor(b.pixel_values).to(hf.dtype),
               image_grid_thw=torch.tensor(b.image_grid_thw),
               mm_token_type_ids=torch.tensor(b.mm_token_type_ids))

    ours = np.asarray(run_jax(), np.float32)
    max_diff = None
    if hf is not None:
        theirs = run_hf().logits.float().numpy()
        max_diff = float(np.abs(ours - theirs)[b.attention_mask.astype(bool)].max())
    times = {"jax": [], "hf": []}
    for _ in range(args.repeats):
        for name, fn in (("jax", run_jax), ("hf", run_hf if hf is not None else None)):
            if fn is None:
                continue
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    tokens = int(b.input_ids.size)
    dev = jax.devices()[0]
    print(f"config={args.config} params={n_params / 1e6:.1f}M dtype={args.dtype} device={dev.platform}:"
          f"{dev.device_kind} batch={args.batch} seq={args.seq} image={args.image}x{args.image} patches "
          f"({b.pixel_values.shape[0]} patch rows, {tokens} tokens incl. padding)")
    print(f"compile: {compile_s:.2f} s")
    jax_best = min(times["jax"])
    print(f"jax jitted forward : best {jax_best * 1e3:8.1f} ms  -> {tokens / jax_best:10.1f} tokens/s")
    if hf is not None:
        import torch

        hf_best = min(times["hf"])
        print(f"transformers eager : best {hf_best * 1e3:8.1f} ms  -> {tokens / hf_best:10.1f} tokens/s "
              f"(torch threads {torch.get_num_threads()})")
        print(f"speed-up (jax / transformers tokens/s): {hf_best / jax_best:.2f}x")
        print(f"max |logit difference| over real tokens: {max_diff:.2e}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        flops = cost.get("flops", float("nan"))
        print(f"XLA cost analysis: {flops / 1e9:.2f} GFLOP per forward, bytes accessed "
              f"{cost.get('bytes accessed', float('nan')) / 1e6:.1f} MB; achieved {flops / jax_best / 1e9:.1f} GFLOP/s")
        if cfg.text.is_moe:
            print("  (MoE: XLA counts the body of the loop over expert tiles once, so the expert matmuls are "
                  "undercounted; the tokens/s figures above are the measure)")
    mem = compiled.memory_analysis()
    if mem is not None:
        print(f"XLA memory analysis: arguments {mem.argument_size_in_bytes / 1e6:.1f} MB, outputs "
              f"{mem.output_size_in_bytes / 1e6:.1f} MB, temporaries {mem.temp_size_in_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
