"""Accelerator check: what one GPU or TPU does with the paper's 2B shapes (random weights), in under 8 minutes.

    python -m vaopd_jax.bench.device                 # on one GPU / TPU (the first device), bf16
    python -m vaopd_jax.bench.device --dry-run       # any machine: tiny shapes, every code path, ~1 min on CPU
    python -m vaopd_jax.bench.device --teacher 4b --peak-tflops 989 --hbm-gbps 3350    # other teacher / peaks

Sections, in this order (each prints its wall time; a section that would start after --budget-s seconds is
skipped and says so, so the whole run stays under the budget):
  0. device: backend, device kind, memory, the peak bf16 TFLOP/s and HBM GB/s used below (datasheet values
     by device kind, `metrics.PEAK_TFLOPS` / `metrics.PEAK_HBM_GBPS`; override with --peak-tflops / --hbm-gbps).
  1. attention agreement: `attend()` forward and gradients (dq, dk, dv) at the 2B's head shape (16 query / 8
     KV heads, head_dim 128), causal, one right-padded row, bf16 inputs; each kernel's error against an fp32
     XLA reference next to XLA's own bf16 error. A kernel agrees when its error is at most 2x XLA-bf16's
     + 1e-3 on every output. Then a 2-layer model of the 2B's width with an image: logits with each kernel vs
     the 'xla' model, same weights. Kernels: 'cudnn' and 'chunked' on an NVIDIA GPU; elsewhere 'chunked'
     (cuDNN cannot run there: the line says so).
  2. prefill: the sampler's prefill (vision tower, 28 layers writing a KV cache, logits at each row's last
     token) of --prefill-batch prompts x --prefill-len tokens with one --image x --image patch image each:
     tokens/s, TFLOP/s and MFU, for each attention kernel of section 1.
  3. fused train step at reduced lengths: the real `distill.step` (2B student with fp32 master params, bf16
     compute, per-block remat; --teacher bf16 teacher on both views; chunked full-vocab KL; AdamW) on
     --step-prompts x --rollouts rollouts of --step-prompt-len + --step-response-len tokens: step time,
     tokens/s, MFU, and XLA's memory analysis of the compiled step.
  4. decode: `rollout.sampler.generate` with --decode-prompts x --rollouts rows, --decode-prompt-len-token
     prompts, --decode-new-tokens new tokens (no end token, so every row decodes them all), temperature 0.7,
     top-p 0.95: decode tokens/s (full call minus a 1-token call) and its fraction of the HBM roofline, i.e.
     rows / ((bf16 weight bytes read per step + KV bytes at the mean context) / HBM bandwidth).

MFU = model FLOPs / (time x peak). Model FLOPs (`forward_flops`): 2 x the text decoder's matmul parameters per
token, causal attention (2 T^2 N D per layer and row, the half that is needed), the LM head where logits are
taken, the vision tower (its matmul parameters per patch, full attention within each image, the mergers per
merged token); a train step counts 3x the student's forward (forward + backward) and the teacher's forward
once per view. Rematerialisation is not counted (it is overhead, not model work).

--dry-run: the same code on tiny shapes (`Qwen3VLConfig.tiny()` student, teacher and attention heads), nominal
peaks (1 TFLOP/s, 50 GB/s) so the MFU and roofline arithmetic runs, and 'chunked' in cuDNN's place when there is
no NVIDIA GPU. tests/test_bench_device.py runs it. `main()` returns every figure in a dict.
"""

from __future__ import annotations

import os

# The fused step at 8B-teacher size needs most of an 80 GB device; JAX preallocates 75 % by default.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse
import dataclasses
import gc
import json
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaopd_jax.runtime import metrics
from vaopd_jax.bench import sample as sample_bench
from vaopd_jax.data import batch as batch_lib
from vaopd_jax.distill import batch as train_batch_lib
from vaopd_jax.distill import state as state_lib
from vaopd_jax.distill import step as step_lib
from vaopd_jax.distill.batch import build_train_batch
from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing
from vaopd_jax.models.qwen3_vl.attention import MaskSpec, attend
from vaopd_jax.parallel import backend as backend_lib
from vaopd_jax.rollout import sampler

GB = 1e9
NOMINAL_TFLOPS, NOMINAL_HBM_GBPS = 1.0, 50.0  # --dry-run on a device without datasheet figures
AGREEMENT_FACTOR, AGREEMENT_FLOOR = 2.0, 1e-3


# ----------------------------------------------------------------------------- model FLOPs
def text_matmul_params(cfg: qwen3_vl.Qwen3VLConfig) -> int:
    """Parameters of the decoder layers' matmuls (q, k, v, o, gate, up, down), all layers (dense decoder)."""
    t = cfg.text
    attn = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
        + t.num_attention_heads * t.head_dim * t.hidden_size
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * (attn + mlp)


def vision_flops(cfg: qwen3_vl.Qwen3VLConfig, patches_per_image) -> float:
    """Forward FLOPs of the vision tower over images of the given patch counts (before merging)."""
    v = cfg.vision
    h, merged = v.hidden_size, v.hidden_size * v.merge_unit
    block = 4 * h * h + 2 * h * v.intermediate_size  # qkv + proj + fc1 + fc2
    mergers = (1 + len(v.deepstack_visual_indexes)) * (merged * merged + merged * v.out_hidden_size)
    total = 0.0
    for p in np.atleast_1d(patches_per_image):
        p = float(p)
        total += 2 * p * (v.patch_dim * h + v.depth * block) + 2 * (p / v.merge_unit) * mergers
        total += v.depth * 4 * p * p * h  # full (non-causal) attention within the image
    return total


def forward_flops(cfg: qwen3_vl.Qwen3VLConfig, seq_lengths, *, logit_positions: int,
                  patches_per_image=()) -> float:
    """Model FLOPs of one forward: rows of `seq_lengths` real tokens, logits at `logit_positions` positions in
    total, the vision tower over `patches_per_image` (see the module docstring)."""
    t = cfg.text
    lengths = np.asarray(seq_lengths, np.float64)
    dense = 2.0 * text_matmul_params(cfg) * lengths.sum()
    attention = 2.0 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * np.square(lengths).sum()
    head = 2.0 * t.hidden_size * t.vocab_size * logit_positions
    return float(dense + attention + head + vision_flops(cfg, patches_per_image))


def decode_bytes_per_step(cfg: qwen3_vl.Qwen3VLConfig, rows: int, mean_context: float, *, weight_bytes: int = 2,
                          cache_bytes: int = 2) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decode step must read from HBM at least: every decoder matmul
    parameter and the LM head once, and the keys and values of `mean_context` positions for each row."""
    t = cfg.text
    weights = (text_matmul_params(cfg) + t.hidden_size * t.vocab_size) * weight_bytes
    kv = 2.0 * t.num_hidden_layers * rows * t.num_key_value_heads * t.head_dim * mean_context * cache_bytes
    return float(weights), float(kv)


# ----------------------------------------------------------------------------- helpers
@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the check uses (`paper_shapes()` on an accelerator, `dry_run_shapes()` on the CPU)."""

    model: qwen3_vl.Qwen3VLConfig  # student / prefill / decode model (attention options set per section)
    teacher: qwen3_vl.Qwen3VLConfig
    attn_batch: int
    attn_len: int
    attn_chunk: int
    agreement_layers: int
    prefill_batch: int
    prefill_len: int
    image: int  # image side in patches (one image per prompt)
    step_prompts: int
    rollouts: int
    step_prompt_len: int
    step_response_len: int
    step_image: int
    kl_chunk: int
    decode_prompts: int
    decode_prompt_len: int
    decode_new_tokens: int
    valid_vocab: int | None


def paper_shapes(args) -> Shapes:
    teacher = {"2b": qwen3_vl.Qwen3VLConfig.qwen3_vl_2b, "4b": qwen3_vl.Qwen3VLConfig.qwen3_vl_4b,
               "8b": qwen3_vl.Qwen3VLConfig.qwen3_vl_8b, "32b": qwen3_vl.Qwen3VLConfig.qwen3_vl_32b}[args.teacher]
    return Shapes(
        model=qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(), teacher=teacher(), attn_batch=2, attn_len=2048, attn_chunk=512,
        agreement_layers=2, prefill_batch=args.prefill_batch, prefill_len=args.prefill_len, image=args.image,
        step_prompts=args.step_prompts, rollouts=args.rollouts, step_prompt_len=args.step_prompt_len,
        step_response_len=args.step_response_len, step_image=args.step_image, kl_chunk=512,
        decode_prompts=args.decode_prompts, decode_prompt_len=args.decode_prompt_len,
        decode_new_tokens=args.decode_new_tokens, valid_vocab=151_669)


def dry_run_shapes() -> Shapes:
    tiny = qwen3_vl.Qwen3VLConfig.tiny()
    return Shapes(
        model=tiny, teacher=qwen3_vl.Qwen3VLConfig.tiny(text=dict(num_hidden_layers=4)), attn_batch=2, attn_len=48,
        attn_chunk=16, agreement_layers=2, prefill_batch=2, prefill_len=64, image=4, step_prompts=2, rollouts=2,
        step_prompt_len=32, step_response_len=16, step_image=4, kl_chunk=8, decode_prompts=2, decode_prompt_len=16,
        decode_new_tokens=8, valid_vocab=None)


def random_model(cfg: qwen3_vl.Qwen3VLConfig, param_dtype, compute_dtype=None, seed: int = 0) -> qwen3_vl.Qwen3VL:
    """Random weights drawn on the device (one jitted init; eager init would draw every tensor on the host)."""
    abstract = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                                       rngs=nnx.Rngs(seed)))
    graphdef, _ = nnx.split(abstract)
    state = jax.jit(lambda: nnx.split(qwen3_vl.Qwen3VL(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                                       rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)


def with_options(model: qwen3_vl.Qwen3VL, *, dtype=None, **changes) -> qwen3_vl.Qwen3VL:
    """The same weights under another runtime config (e.g. attention_impl=...), cast to `dtype` (params and
    compute) when given; without a cast the arrays are shared, not copied."""
    cfg = model.config.replace(**changes)
    param_dtype = dtype or model.param_dtype
    compute_dtype = dtype or model.compute_dtype
    abstract = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                                       rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), nnx.state(model),
                         abstract_state)
    return nnx.merge(graphdef, state)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def prompts_with_image(cfg, num_prompts: int, prompt_len: int, image: int, seed: int = 0):
    """`num_prompts` right-padded prompts of `prompt_len` tokens, each text + one image of image x image patches
    + text; the last prompt 8 tokens shorter (right padding is exercised)."""
    image_tokens = image * image // cfg.vision.merge_unit
    text = max((prompt_len - image_tokens - 2) // 2, 1)
    batch = testing.make_batch(cfg, [[(1, image, image)]] * num_prompts, [text] * num_prompts, seed=seed,
                               pad_to=prompt_len)
    if num_prompts > 1:
        last = int(batch.attention_mask[-1].sum())
        batch.attention_mask[-1, last - 8:] = 0
        batch.input_ids[-1, last - 8:] = 0
    return batch


def si(x: float, unit: str) -> str:
    """1.23e12 -> '1.23 T<unit>' (k, M, G, T, P)."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def mfu_text(flops: float, seconds: float, peak_tflops: float) -> str:
    return f"{flops / seconds / 1e12:8.1f} TFLOP/s, MFU {flops / seconds / (peak_tflops * 1e12):6.1%}"


def attention_impls(info: backend_lib.BackendInfo) -> tuple[list[str], str]:
    """(kernels to measure, a note) for this backend: cuDNN only on NVIDIA GPUs."""
    if info.platform == "gpu" and info.device_kind.startswith("NVIDIA"):
        return ["cudnn", "chunked"], ""
    return ["chunked"], f"cuDNN attention needs an NVIDIA GPU; not measured on {info.platform} ({info.device_kind})"


# ----------------------------------------------------------------------------- 0. device
def device_section(args, info: backend_lib.BackendInfo) -> dict:
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = {}
    memory = stats.get("bytes_limit")
    peak = metrics.peak_tflops(info.device_kind, args.peak_tflops)
    hbm = metrics.peak_hbm_gbps(info.device_kind, args.hbm_gbps)
    source = "datasheet by device kind" if not (args.peak_tflops or args.hbm_gbps) else "from the command line"
    if peak is None or hbm is None:
        if not args.dry_run:
            raise SystemExit(f"no datasheet peak for device kind {info.device_kind!r}: pass --peak-tflops and "
                             "--hbm-gbps (dense bf16 TFLOP/s and HBM GB/s of one device)")
        peak, hbm = peak or NOMINAL_TFLOPS, hbm or NOMINAL_HBM_GBPS
        source = "nominal: a dry run without datasheet figures"
    print(backend_lib.describe(info))
    print(f"device 0: {info.device_kind}, memory {memory / GB:.1f} GB" if memory else
          f"device 0: {info.device_kind}, memory not reported by this backend")
    print(f"peak bf16 {peak:.0f} TFLOP/s, HBM {hbm:.0f} GB/s ({source})")
    return {"device_kind": info.device_kind, "platform": info.platform, "memory_bytes": memory,
            "peak_tflops": peak, "hbm_gbps": hbm}


# ----------------------------------------------------------------------------- 1. attention agreement
def _attention_vjp(impl: str, dtype, q, k, v, cotangent, mask: MaskSpec, chunk: int):
    def f(q_, k_, v_):
        return attend(q_, k_, v_, mask, impl, chunk_size=chunk)

    @jax.jit
    def run(q_, k_, v_, ct):
        out, vjp = jax.vjp(f, q_.astype(dtype), k_.astype(dtype), v_.astype(dtype))
        return (out,) + vjp(ct.astype(dtype))

    return [np.asarray(x, np.float32) for x in run(q, k, v, cotangent)]


def agreement_section(shapes: Shapes, impls: list[str], note: str) -> dict:
    t = shapes.model.text
    b, s, n, kh, d = shapes.attn_batch, shapes.attn_len, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, s, n, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
    lengths = np.full((b,), s)
    lengths[-1] = s * 3 // 4  # one right-padded row
    valid = np.arange(s)[None, :] < lengths[:, None]
    mask = MaskSpec(key_valid=jnp.asarray(valid), causal=True)
    # Padded query rows are never read by the model: no cotangent there (cuDNN may leave them undefined).
    cotangent = jax.random.normal(keys[3], (b, s, n, d), jnp.float32) * valid[:, :, None, None]
    names = ("out", "dq", "dk", "dv")
    reference = _attention_vjp("xla", jnp.float32, q, k, v, cotangent, mask, shapes.attn_chunk)

    def errors(outputs):
        errs = {}
        for name, got, ref in zip(names, outputs, reference):
            row_mask = valid[:, :, None, None]  # queries (out, dq) and keys (dk, dv) share the sequence axis
            scale = max(float(np.abs(ref * row_mask).max()), 1e-30)
            errs[name] = float(np.abs((got - ref) * row_mask).max()) / scale
        return errs

    print(f"attention: batch {b} x {s} tokens, {n} query / {kh} KV heads, head_dim {d}, causal, last row right-padded "
          f"to {lengths[-1]}; bf16 inputs; max |error| / max |fp32 reference| over real rows")
    if note:
        print(f"  ({note})")
    results = {"xla_bf16": errors(_attention_vjp("xla", jnp.bfloat16, q, k, v, cotangent, mask, shapes.attn_chunk))}
    for impl in impls:
        results[impl] = errors(_attention_vjp(impl, jnp.bfloat16, q, k, v, cotangent, mask, shapes.attn_chunk))
    print(f"  {'kernel':10s}" + "".join(f"{name:>10s}" for name in names) + "   verdict")
    agrees = {}
    for impl, errs in results.items():
        if impl == "xla_bf16":
            verdict = "(the yardstick)"
        else:
            agrees[impl] = all(errs[x] <= AGREEMENT_FACTOR * results["xla_bf16"][x] + AGREEMENT_FLOOR for x in names)
            verdict = ("agrees" if agrees[impl] else
                       f"DISAGREES (> {AGREEMENT_FACTOR:g}x xla bf16 + {AGREEMENT_FLOOR:g})")
        print(f"  {impl:10s}" + "".join(f"{errs[x]:10.2e}" for x in names) + f"   {verdict}")

    # The whole model: same weights, each kernel vs 'xla' (the parity path), logits at real positions.
    cfg = shapes.model.replace(text=dataclasses.replace(shapes.model.text, num_hidden_layers=shapes.agreement_layers),
                               attention_chunk_size=shapes.attn_chunk)
    model = random_model(cfg, jnp.bfloat16)
    batch = prompts_with_image(cfg, 2, min(shapes.attn_len, 512), shapes.image)
    pos, _ = qwen3_vl.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg)
    vision = qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg)
    real = batch.attention_mask.astype(bool)

    def logits(impl, dtype):
        m = with_options(model, dtype=dtype, attention_impl=impl)
        out = m(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                jnp.asarray(batch.pixel_values, dtype), position_ids=jnp.asarray(pos), vision_inputs=vision)
        return np.asarray(out, np.float32)[real]

    ref32 = logits("xla", jnp.float32)
    scale = float(ref32.std())
    model_err = {"xla_bf16": float(np.abs(logits("xla", jnp.bfloat16) - ref32).max()) / scale}
    for impl in impls:
        model_err[impl] = float(np.abs(logits(impl, jnp.bfloat16) - ref32).max()) / scale
    print(f"model: {shapes.agreement_layers}-layer model of this width with one {shapes.image}x{shapes.image}-patch "
          f"image per row, bf16 weights; max |logit error| / std(fp32 logits) = " +
          ", ".join(f"{impl} {err:.2e}" for impl, err in model_err.items()))
    for impl in impls:
        ok = model_err[impl] <= AGREEMENT_FACTOR * model_err["xla_bf16"] + AGREEMENT_FLOOR
        agrees[impl] = agrees[impl] and ok
        print(f"  {impl}: {'agrees' if ok else 'DISAGREES'} with the model's XLA path")
    return {"kernel_errors": results, "model_errors": model_err, "agrees": agrees}


# ----------------------------------------------------------------------------- 2. prefill
def prefill_section(shapes: Shapes, impls: list[str], peak: float, repeats: int) -> dict:
    cfg = shapes.model.replace(attention_chunk_size=shapes.attn_chunk)
    model = random_model(cfg, jnp.bfloat16)
    batch = prompts_with_image(cfg, shapes.prefill_batch, shapes.prefill_len, shapes.image)
    pos, _ = qwen3_vl.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg)
    vision = jax.tree.map(jnp.asarray, qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg))
    args = (jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(pos),
            jnp.asarray(batch.pixel_values, jnp.bfloat16), vision)
    lengths = batch.attention_mask.sum(1)
    patches = np.prod(batch.image_grid_thw, axis=1)
    flops = forward_flops(cfg, lengths, logit_positions=len(lengths), patches_per_image=patches)
    print(f"prefill: {shapes.prefill_batch} prompts x {shapes.prefill_len} tokens ({int(lengths.sum())} real), one "
          f"{shapes.image}x{shapes.image}-patch image each, bf16, random weights; {si(flops, 'FLOP')} per call")
    out = {}
    for impl in impls:
        graphdef, state = nnx.split(with_options(model, attention_impl=impl))

        @jax.jit
        def prefill(state, ids, mask, position_ids, pixels, vision_inputs):
            m = nnx.merge(graphdef, state)
            cache = m.init_cache(ids.shape[0], ids.shape[1])
            return m.prefill(ids, mask, position_ids, cache=cache, pixel_values=pixels, vision_inputs=vision_inputs,
                             last_only=True)

        start = time.perf_counter()
        compiled = prefill.lower(state, *args).compile()
        compile_s = time.perf_counter() - start
        seconds = best_time(lambda: compiled(state, *args), repeats)
        tokens_per_s = float(lengths.sum()) / seconds
        print(f"  {impl:8s}: {seconds * 1e3:8.1f} ms  {tokens_per_s:12,.0f} tokens/s  {mfu_text(flops, seconds, peak)}"
              f"  (compile {compile_s:.0f} s)")
        out[impl] = {"seconds": seconds, "tokens_per_s": tokens_per_s, "mfu": flops / seconds / (peak * 1e12)}
    return out


# ----------------------------------------------------------------------------- 3. fused train step
def step_section(shapes: Shapes, impl: str, peak: float, repeats: int) -> dict:
    options = dict(attention_impl=impl, attention_chunk_size=shapes.attn_chunk)
    student_cfg, teacher_cfg = shapes.model.replace(**options), shapes.teacher.replace(**options)
    student = random_model(student_cfg, jnp.float32, jnp.bfloat16, seed=1)
    teacher = random_model(teacher_cfg, jnp.bfloat16, seed=2)
    n_student = sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param)))
    n_teacher = sum(x.size for x in jax.tree.leaves(nnx.state(teacher, nnx.Param)))
    p, k, r = shapes.step_prompts, shapes.rollouts, shapes.step_response_len
    batch = prompts_with_image(student_cfg, p, shapes.step_prompt_len, shapes.step_image, seed=3)
    rng = np.random.default_rng(0)
    prompts = batch_lib.from_flat(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                                  student_cfg, pixel_values_pixelated=rng.standard_normal(
                                      batch.pixel_values.shape).astype(np.float32))
    tokens = rng.integers(0, min(student_cfg.vision_start_token_id, student_cfg.text.vocab_size), (p * k, r))
    lengths = rng.integers(r // 2, r + 1, p * k)
    mask = (np.arange(r)[None] < lengths[:, None]).astype(np.float32)
    train_batch = train_batch_lib.shard_batch(build_train_batch(prompts, tokens.astype(np.int32), mask, k, student_cfg))

    optimizer = state_lib.make_optimizer(1e-6, total_steps=1000)
    state = state_lib.create_train_state(student, optimizer, jax.random.key(0), remat="block")
    del student
    teacher_graphdef, teacher_params = state_lib.split_teacher(teacher)
    del teacher
    config = step_lib.StepConfig(num_rollouts=k, kl_chunk_size=shapes.kl_chunk, valid_vocab_size=shapes.valid_vocab)
    train_step = step_lib.make_train_step(config, teacher_graphdef, optimizer)
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = train_step.lower(state, teacher_params, train_batch, key).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    state, step_metrics = compiled(state, teacher_params, train_batch, key)  # warm-up
    jax.block_until_ready(step_metrics)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        state, step_metrics = compiled(state, teacher_params, train_batch, key)
        jax.block_until_ready((state.params, step_metrics))
        times.append(time.perf_counter() - begin)
    seconds = float(np.median(times))
    loss = float(step_metrics["loss"])

    seq = np.asarray(train_batch.attention_mask).sum(1)  # prompt + response tokens per rollout
    patches = np.prod(batch.image_grid_thw, axis=1)  # one image per prompt; each vision pass runs once per prompt
    response_tokens = int(mask.sum())
    fwd = lambda cfg: forward_flops(cfg, seq, logit_positions=response_tokens, patches_per_image=patches)  # noqa: E731
    flops = 3 * fwd(student_cfg) + 2 * fwd(teacher_cfg)  # student forward + backward; teacher on both views
    peak_bytes = None
    if mem is not None:
        peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                      + mem.temp_size_in_bytes)
    print(f"fused step: student {si(n_student, 'params')} (fp32 master, bf16 compute, remat block), teacher "
          f"{si(n_teacher, 'params')} (bf16), {p} prompts x {k} rollouts, prompt {shapes.step_prompt_len} + response "
          f"{r} tokens ({int(seq.sum())} tokens, {response_tokens} response), attention {impl}, KL chunk "
          f"{shapes.kl_chunk}; {si(flops, 'FLOP')} per step")
    print(f"  step {seconds:.3f} s (median of {repeats}), {seq.sum() / seconds:,.0f} tokens/s, "
          f"{mfu_text(flops, seconds, peak)}; compile {compile_s:.0f} s; loss {loss:.4f}")
    if peak_bytes is not None:
        print(f"  XLA memory: arguments {si(mem.argument_size_in_bytes, 'B')}, temp {si(mem.temp_size_in_bytes, 'B')}, "
              f"peak {si(peak_bytes, 'B')}")
    return {"seconds": seconds, "mfu": flops / seconds / (peak * 1e12), "loss": loss, "peak_bytes": peak_bytes,
            "tokens_per_s": float(seq.sum()) / seconds}


# ----------------------------------------------------------------------------- 4. decode
def decode_section(shapes: Shapes, hbm_gbps: float, repeats: int) -> dict:
    cfg = shapes.model.replace(attention_chunk_size=shapes.attn_chunk)
    model = random_model(cfg, jnp.bfloat16)
    ids, mask = sample_bench.random_prompts(cfg, shapes.decode_prompts, shapes.decode_prompt_len)
    k, n = shapes.rollouts, shapes.decode_new_tokens
    rows = shapes.decode_prompts * k
    kwargs = dict(num_samples=k, temperature=0.7, top_p=0.95, eos_token_ids=(), rng=0, min_new_bucket=n)

    def call(new_tokens):
        return sampler.generate(model, ids, mask, max_new_tokens=new_tokens, **kwargs)

    start = time.perf_counter()
    out = jax.block_until_ready(call(n))
    compile_s = time.perf_counter() - start
    if int(np.asarray(out.lengths).min()) != n:
        raise RuntimeError(f"decode: a row stopped before {n} tokens (lengths {np.asarray(out.lengths)})")
    jax.block_until_ready(call(1))  # same program; its first call also traces the host-side output slicing
    full = best_time(lambda: call(n), repeats)
    prefill = best_time(lambda: call(1), repeats)
    decode_s = full - prefill
    if decode_s <= 0:
        raise RuntimeError(f"decode: the {n}-token call ({full:.4f} s) was not slower than the 1-token call "
                           f"({prefill:.4f} s); raise --decode-new-tokens or --repeats")
    tokens_per_s = rows * (n - 1) / decode_s
    mean_context = float(np.mean(mask.sum(1))) + n / 2
    weight_bytes, kv_bytes = decode_bytes_per_step(cfg, rows, mean_context)
    roofline = rows / ((weight_bytes + kv_bytes) / (hbm_gbps * 1e9))
    print(f"decode: {shapes.decode_prompts} prompts x K={k} = {rows} rows, prompts of {int(mask.sum(1).min())}-"
          f"{int(mask.sum(1).max())} tokens, {n} new tokens each (no end token), temperature 0.7, top-p 0.95, bf16")
    print(f"  {tokens_per_s:,.0f} tokens/s ({decode_s / (n - 1) * 1e3:.2f} ms per step; prefill "
          f"{prefill * 1e3:.0f} ms; compile + first call {compile_s:.0f} s)")
    print(f"  HBM roofline: {si(weight_bytes, 'B')} weights + {si(kv_bytes, 'B')} KV (mean context "
          f"{mean_context:.0f}) per step at {hbm_gbps:.0f} GB/s -> {roofline:,.0f} tokens/s; measured "
          f"{tokens_per_s / roofline:.1%} of it")
    return {"tokens_per_s": tokens_per_s, "roofline_tokens_per_s": roofline, "fraction": tokens_per_s / roofline,
            "ms_per_step": decode_s / (n - 1) * 1e3}


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on any backend (the tests run this)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="skip the sections that would start after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 TFLOP/s of one device (0: by kind)")
    p.add_argument("--hbm-gbps", type=float, default=0.0, help="HBM GB/s of one device (0: by kind)")
    p.add_argument("--sections", default="agreement,prefill,step,decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--teacher", default="8b", choices=("2b", "4b", "8b", "32b"), help="teacher of the fused step")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--image", type=int, default=32, help="image side in patches (32: a 512 x 512 image)")
    p.add_argument("--step-prompts", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--step-prompt-len", type=int, default=512)
    p.add_argument("--step-response-len", type=int, default=1024)
    p.add_argument("--step-image", type=int, default=32)
    p.add_argument("--decode-prompts", type=int, default=16)
    p.add_argument("--decode-prompt-len", type=int, default=1024)
    p.add_argument("--decode-new-tokens", type=int, default=512)
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    begin = time.perf_counter()
    info = backend_lib.backend_info()
    shapes = dry_run_shapes() if args.dry_run else paper_shapes(args)
    if info.platform == "cpu" and not args.dry_run:
        raise SystemExit("JAX runs on the CPU here: run with --dry-run, or on a GPU/TPU (" + backend_lib.INSTALL_HINT
                         + ")")
    impls, note = attention_impls(info)
    print(f"== 0. device{' (DRY RUN: tiny shapes)' if args.dry_run else ''}")
    results = {"device": device_section(args, info), "skipped": []}
    peak, hbm = results["device"]["peak_tflops"], results["device"]["hbm_gbps"]
    sections = {
        "agreement": ("1. attention agreement", lambda: agreement_section(shapes, impls, note)),
        "prefill": ("2. prefill", lambda: prefill_section(shapes, impls, peak, args.repeats)),
        "step": ("3. fused train step (reduced lengths)", lambda: step_section(shapes, impls[0], peak, args.repeats)),
        "decode": ("4. decode", lambda: decode_section(shapes, hbm, min(args.repeats, 2))),
    }
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in sections:
            raise SystemExit(f"--sections: unknown section {name!r}; choose from {sorted(sections)}")
        title, run = sections[name]
        elapsed = time.perf_counter() - begin
        if elapsed > args.budget_s:
            print(f"== {title}: SKIPPED ({elapsed:.0f} s used of --budget-s {args.budget_s:.0f})")
            results["skipped"].append(name)
            continue
        print(f"== {title}", flush=True)
        start = time.perf_counter()
        results[name] = run()
        gc.collect()
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    results["total_s"] = time.perf_counter() - begin
    print(f"== total {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
