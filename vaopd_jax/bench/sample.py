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
    """Runs the paper-scale AOT report in a subprocess with 8 simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--part", "aot-here"]
    subprocess.run(cmd, env=env, check=True)


def aot_report(num_prompts=16, num_samples=4, prompt_len=1024, image_tokens=768, max_new_tokens=4096,
               mesh_shape=(1, 8, 1)):
    """The paper-scale rollout program from abstract shapes on a simulated (data, fsdp, tensor) mesh: prints XLA's
    per-device memory analysis. Call in a process with >= 8 devices."""
    from jax.sharding import NamedSharding, PartitionSpec

    from vaopd_jax.models.qwen3_vl import sharding as model_sharding

    devices = np.asarray(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(attention_impl="chunked")
    model = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                                                    rngs=nnx.Rngs(0)))
    _, state = nnx.split(model, nnx.Param)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    leaves, treedef = jax.tree.flatten(state)
    abstract_state = jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, model_sharding.logical_to_spec(
            v.get_metadata()["logical_axes"], None, mesh, v.shape))) for x, v in zip(leaves, variables)])

    def sds(shape, dtype, axes=None):
        spec = PartitionSpec() if axes is None else model_sharding.logical_to_spec(axes, mesh=mesh, shape=shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    patches = image_tokens * cfg.vision.merge_unit  # one image per prompt
    vision = qwen3_vl.VisionInputs(
        rotary_pos=sds((num_prompts, patches, 2), jnp.int32, ("batch", None, None)),
        interp_indices=sds((num_prompts, patches, 4), jnp.int32, ("batch", None, None)),
        interp_weights=sds((num_prompts, patches, 4), jnp.float32, ("batch", None, None)),
        segment_ids=sds((num_prompts, patches), jnp.int32, ("batch", None)),
        valid=sds((num_prompts, patches), jnp.bool_, ("batch", None)),
        merged_valid=sds((num_prompts, image_tokens), jnp.bool_, ("batch", None)))
    rollouts = sampler.Sampler(model, max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=0.7,
                               top_p=0.95, valid_vocab_size=151_669, mesh=mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (abstract_state, sds((num_prompts, prompt_len), jnp.int32, ("batch", None)),
            sds((num_prompts, prompt_len), jnp.int32, ("batch", None)),
            sds((3, num_prompts, prompt_len), jnp.int32, (None, "batch", None)),
            sds((num_prompts,), jnp.int32, ("batch",)),
            sds((num_prompts, patches, cfg.vision.patch_dim), jnp.float32, ("batch", None, None)), vision,
            sds((num_prompts * image_tokens,), jnp.int32), sds((), jnp.int32),
            jax.ShapeDtypeStruct(key.shape, key.dtype), sds((8,), jnp.int32), sds((), jnp.int32), sds((), jnp.int32),
            sds((8,), jnp.int32))
    start = time.perf_counter()
    # The Sampler's own program and mesh context (jax.set_mesh, as for the train step).
    lowered = rollouts._run.lower(*args, program=rollouts.program)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    mem = compiled.memory_analysis()
    rows, slots = num_prompts * num_samples, prompt_len + max_new_tokens
    t = cfg.text
    cache = 2 * t.num_hidden_layers * rows * t.num_key_value_heads * slots * t.head_dim * 2
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    print(f"== aot: 2B student rollout program, {num_prompts} prompts x {num_samples} samples, prompt {prompt_len} "
          f"({image_tokens} image tokens) + {max_new_tokens} new tokens, mesh "
          f"{'x'.join(f'{k}={v}' for k, v in mesh.shape.items())}: lower {lower_s:.0f} s, compile {compile_s:.0f} s")
    print(f"  per device: arguments {mem.argument_size_in_bytes / GB:.2f} GB, outputs "
          f"{mem.output_size_in_bytes / GB:.3f} GB, temp {mem.temp_size_in_bytes / GB:.2f} GB "
          f"-> peak {peak / GB:.2f} GB "
          "(the bf16 KV cache alone: "
          f"{cache / GB:.1f} GB in all, {cache / GB / mesh.size:.2f} GB per device)", flush=True)
    return mem


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
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.part.split(",") if x.strip()}
    if parts == {"aot-here"}:  # the subprocess of part_aot
        aot_report()
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
