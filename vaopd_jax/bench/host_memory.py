"""Real-size host memory: loading a Qwen3-VL-2B checkpoint and one plain forward, peak RSS against the
parameters' bytes and against transformers, on a random-weight checkpoint this command writes itself.

    python -m vaopd_jax.bench.host_memory                         # bf16: write, load, forward, transformers
    python -m vaopd_jax.bench.host_memory --dtype float32 --parts load,forward
    python -m vaopd_jax.bench.host_memory --dir /tmp/qwen3vl2b-random --keep   # reuse / keep the checkpoint

Needs ~16 GB of free host memory at its peak (bf16; check `free -g`, run it alone). Steps, each in a fresh
subprocess so that its peak RSS (getrusage ru_maxrss) is its own:
- write: a random-weight Qwen3-VL-2B (the released config) drawn on the device by one jitted init, saved
  with `convert.save_hf_checkpoint` in --dtype (5 GB shards).
- load: `load_hf_checkpoint(dir, dtype)`: peak RSS, and that peak less the RSS after the imports, against
  the parameters' bytes in that dtype (goal: <= 1.2x).
- forward: the load, then one plain forward (logits) of one row: text around one 448 x 448 image (256 image
  tokens), --tokens tokens in all: peak RSS (goal: <= transformers').
- transformers: `Qwen3VLForConditionalGeneration.from_pretrained(dir, dtype=...)` and the same forward
  (torch, no grad): peak RSS; the logits of both are compared (max |diff| and argmax agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

GB = 1e9


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(tokens: int):
    """One row: text, one 448 x 448 image (32 x 32 patches -> 256 merged tokens), text; deterministic."""
    import numpy as np

    from vaopd_jax.models import qwen3_vl
    from vaopd_jax.models.qwen3_vl import testing

    cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b()
    text = (tokens - 256 - 2) // 2
    batch = testing.make_batch(cfg, [[(1, 32, 32)]], [text], seed=0)
    return cfg, np.asarray(batch.input_ids), np.asarray(batch.attention_mask), np.asarray(
        batch.pixel_values, np.float32), np.asarray(batch.image_grid_thw)


def child_write(path: str, dtype: str):
    """Random weights one parameter at a time (N(0, 0.02); norm scales 1), then save_hf_checkpoint in 1 GB
    shards: the host holds the model and one shard, not a full-model init (f32 draws) beside it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vaopd_jax.models import qwen3_vl
    from vaopd_jax.models.qwen3_vl import convert

    dt = jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(), param_dtype=dt,
                                                    rngs=nnx.Rngs(0)))
    draw = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt),
                   static_argnums=1)
    for i, (path_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        norm = any("norm" in str(k) for k in path_)
        var.set_value(jnp.ones(var.shape, dt) if norm else draw(jax.random.key(i), tuple(var.shape)))
    convert.save_hf_checkpoint(model, path, max_shard_bytes=1 << 30)
    return {}


def child_load(path: str, dtype: str, forward: bool, tokens: int, out: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vaopd_jax.models.qwen3_vl import convert

    jax.devices()
    base = _rss_now()
    start = time.perf_counter()
    model = convert.load_hf_checkpoint(path, dtype=jnp.dtype(dtype))
    load_s = time.perf_counter() - start
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    result = {"baseline": base, "params_bytes": params, "load_s": load_s, "after_load_peak": _peak()}
    if forward:
        from vaopd_jax.models.qwen3_vl import model as model_lib

        _, ids, mask, pixels, grid = _inputs(tokens)
        start = time.perf_counter()
        # The program `model(...)` runs on the CPU (model._dispatch), compiled apart so that XLA's own compile
        # memory and the run's can be told apart.
        args = model._prepare(ids, mask, pixels, grid, None, None)
        graphdef, state = nnx.split(model)
        compiled = model_lib._hidden_cpu_jit.lower(graphdef, state, *args, None, (), True).compile()
        result["after_compile_peak"] = _peak()
        result["temp"] = compiled.memory_analysis().temp_size_in_bytes
        result["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        logits = np.asarray(compiled(state, *args, None, ()))
        result["forward_s"] = time.perf_counter() - start
        np.save(out, logits[0, -16:])
    result["peak"] = _peak()
    return result


def child_hf(path: str, dtype: str, tokens: int, out: str):
    import numpy as np
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.set_num_threads(os.cpu_count() or 1)
    base = _rss_now()
    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - start
    result = {"baseline": base, "load_s": load_s, "after_load_peak": _peak(),
              "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    cfg, ids, mask, pixels, grid = _inputs(tokens)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       pixel_values=torch.tensor(pixels).to(getattr(torch, dtype)),
                       image_grid_thw=torch.tensor(grid),
                       mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int32))).logits
    result["forward_s"] = time.perf_counter() - start
    np.save(out, logits[0, -16:].float().numpy())
    result["peak"] = _peak()
    return result


def _run(step: str, *args) -> dict:
    cmd = [sys.executable, "-m", "vaopd_jax.bench.host_memory", "--child", step, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed (exit {proc.returncode}; killed for memory if -9):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--parts", default="load,forward,transformers")
    p.add_argument("--dir", default="", help="checkpoint directory (written when it has no config.json)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint written in a temporary directory")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the forward's row")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        step, rest = args.child[0], args.child[1:]
        fn = {"write": lambda: child_write(rest[0], rest[1]),
              "load": lambda: child_load(rest[0], rest[1], rest[2] == "1", int(rest[3]), rest[4]),
              "hf": lambda: child_hf(rest[0], rest[1], int(rest[2]), rest[3])}[step]
        print(json.dumps(fn()))
        return
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    path = args.dir or tempfile.mkdtemp(prefix="qwen3vl2b-random-")
    work = tempfile.mkdtemp(prefix="host-memory-")
    print(f"load at start: {os.getloadavg()[0]:.1f}; host memory free: {os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB:.1f} GB "
          f"of {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB:.1f} GB", flush=True)
    try:
        if not os.path.exists(os.path.join(path, "config.json")):
            start = time.perf_counter()
            _run("write", path, args.dtype)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            print(f"wrote a random-weight Qwen3-VL-2B ({args.dtype}, {size / GB:.2f} GB) to {path} in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        if "load" in parts:
            results["load"] = r = _run("load", path, args.dtype, 0, args.tokens, os.path.join(work, "x.npy"))
            print(f"load ({args.dtype}): peak RSS {r['peak'] / GB:.2f} GB ({r['peak'] / r['params_bytes']:.2f}x the "
                  f"{r['params_bytes'] / GB:.2f} GB of parameters); above the {r['baseline'] / GB:.2f} GB after the "
                  f"imports: {(r['peak'] - r['baseline']) / GB:.2f} GB ({(r['peak'] - r['baseline']) / r['params_bytes']:.2f}x); "
                  f"{r['load_s']:.0f} s", flush=True)
        if "forward" in parts:
            results["forward"] = r = _run("load", path, args.dtype, 1, args.tokens, os.path.join(work, "ours.npy"))
            print(f"load + one forward of {args.tokens} tokens ({args.dtype}): peak RSS {r['peak'] / GB:.2f} GB "
                  f"({r['peak'] / r['params_bytes']:.2f}x the parameters); of it XLA's compile: peak "
                  f"{r['after_compile_peak'] / GB:.2f} GB after compiling ({r['compile_s']:.0f} s); the program's "
                  f"temp {r['temp'] / GB:.2f} GB; forward {r['forward_s']:.1f} s", flush=True)
        if "transformers" in parts:
            results["transformers"] = r = _run("hf", path, args.dtype, args.tokens, os.path.join(work, "hf.npy"))
            print(f"transformers load + the same forward ({args.dtype}): peak RSS {r['peak'] / GB:.2f} GB "
                  f"(load alone {r['after_load_peak'] / GB:.2f} GB; {r['peak'] / r['params_bytes']:.2f}x the "
                  f"parameters); forward {r['forward_s']:.1f} s", flush=True)
        if {"forward", "transformers"} <= parts:
            import numpy as np

            ours, hf = np.load(os.path.join(work, "ours.npy")), np.load(os.path.join(work, "hf.npy"))
            agree = int((ours.argmax(-1) == hf.argmax(-1)).sum())
            print(f"logits of the last 16 positions: max |ours - transformers| {np.abs(ours - hf).max():.3f} "
                  f"(logit std {hf.std():.2f}); argmax agrees on {agree} of 16; peak RSS ours / transformers "
                  f"{results['forward']['peak'] / results['transformers']['peak']:.2f}")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir and not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
