"""PROJECTED time of one VA-OPD RL step on a GPU / TPU host, from FLOP and byte counts (nothing here runs on
an accelerator; the figures are a projection, not a measurement).

    python -m vaopd_jax.bench.projection                          # h100x8, a100x8, v6e-8 x 8B/32B x 2,048/4,096
    python -m vaopd_jax.bench.projection --targets a100x8 --teachers 8b --responses 4096 --mfu 0.4
    python -m vaopd_jax.bench.projection --decode-bytes analytic  # no compile: analytic decode bytes only

The paper's step (configs/paper.py): 16 Geometry3K-like prompts x K=4 rollouts, a 1,024-token prompt of which
768 tokens are one image (3,072 patches), responses of --responses tokens, 2B student, bf16 teacher, on one
host of the target (8 devices; mesh fsdp=8). Components, each a time = work / (devices x rate x efficiency):
- rollout prefill: the 16 prompts once (prefix sharing), vision tower included; FLOPs / peak.
- rollout decode: every one of the 64 rows generates the full response (an upper bound: rows that end early
  are compacted out, rollout/decode.py). One step at context c reads its bytes and does its FLOPs; the time is
  max(bytes / HBM bandwidth, FLOPs / peak) per step, summed over the steps (bytes are linear in c, so the
  step at the mean context times the steps is the sum). Bytes per step: the compiler's own count for the
  decode-step program (`bench.sample` 'decode', the sampler's loop body: fp32 master params as in training)
  compiled for --bytes-from (a TPU: the GPU compiler reports no cost analysis, so the GPU rows use the TPU
  compile of the same program over the same 8-way mesh), or the analytic least bytes (bf16 weights read
  once per step by every device + its rows' KV cache) with --decode-bytes analytic.
- teacher passes: two forwards (real and pixelated image) over 64 rows x (prompt + response), logits at the
  response positions; FLOPs / peak.
- student: forward + backward with per-block remat = 4 forwards; FLOPs / peak.
- KL and softmaxes: full-vocabulary fp32 logits read / written ~6 times (teacher x2, student fwd/bwd); bytes.
- optimizer: AdamW over the fp32 student (~28 bytes per parameter moved); bytes.
FLOPs are analytic (`bench.device.forward_flops`: 2 x matmul parameters per token, causal attention, the LM
head where logits are taken, the vision tower). Collectives (FSDP all-gathers, reduce-scatters) are assumed
overlapped with compute; host-side work (data, grading) is not counted. Efficiencies: --mfu of the peak for
compute-bound parts, --hbm-eff of the bandwidth for memory-bound parts, and --step-overhead-us per decode
step (kernel launches / loop control).

Beside it: the authors' release, about 105 s per step on 8 x A100 80GB (19.3 h for ~655 steps in their logs).
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp

from vaopd_jax.bench import device as device_bench
from vaopd_jax.models import qwen3_vl
from vaopd_jax.parallel import targets as targets_lib

RELEASE_S_PER_STEP = 19.3 * 3600 / 655  # the authors' logs: 19.3 h for ~655 steps on 8 x A100 80GB (~106 s)
PROMPTS, ROLLOUTS, PROMPT_LEN, IMAGE_TOKENS = 16, 4, 1024, 768
TEACHERS = {"4b": qwen3_vl.Qwen3VLConfig.qwen3_vl_4b, "8b": qwen3_vl.Qwen3VLConfig.qwen3_vl_8b,
            "32b": qwen3_vl.Qwen3VLConfig.qwen3_vl_32b}


def decode_step_flops(cfg, rows: int, context: float) -> float:
    """One decode step of `rows` rows at `context` cached slots: matmuls, LM head, attention over the cache."""
    t = cfg.text
    dense = 2.0 * (device_bench.text_matmul_params(cfg) + t.hidden_size * t.vocab_size) * rows
    attention = 4.0 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * context * rows
    return dense + attention


def rollout_mesh(target, kind: str):
    """The sampler's mesh: 'fsdp' (the train mesh, rows split over the devices, every device reads every weight
    each step) or 'tensor' (weights, KV heads and vocabulary split over the devices, every row on each)."""
    return targets_lib.make_mesh(target, fsdp=-1) if kind == "fsdp" else targets_lib.make_mesh(target, fsdp=1,
                                                                                                tensor=-1)


def compiled_decode_bytes(target_name: str, context: int, response: int, mesh_kind: str = "fsdp",
                          param_dtype: str = "float32") -> tuple[float, float]:
    """(the compiler's bytes accessed per device, the analytic least bytes per device) of one decode step of
    the paper's rollout at `context` slots, compiled for `target_name` (bench.sample's 'decode' program)."""
    from vaopd_jax.bench import aot, sample

    target = targets_lib.get(target_name)
    mesh = rollout_mesh(target, mesh_kind)
    cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(attention_impl="chunked")
    lowerings, shape = sample.rollout_lowerings(cfg, mesh, param_dtype=jnp.dtype(param_dtype), num_prompts=PROMPTS,
                                                num_samples=ROLLOUTS,
                                                prompt_len=PROMPT_LEN, image_tokens=IMAGE_TOKENS,
                                                max_new_tokens=response, context=context)
    mem, *_ = aot.compile_program(f"decode step at context {context}", lowerings["decode"], target)
    if mem.bytes_accessed is None:
        raise SystemExit(f"--bytes-from {target_name}: its compiler reports no bytes accessed; use a TPU target")
    return mem.bytes_accessed, sample.decode_roofline_bytes(cfg, shape["rows"], context, mesh)


def project(target: targets_lib.Target, teacher: str, response: int, *, mfu: float, hbm_eff: float,
            overhead_us: float, decode_bytes_per_step: float) -> dict:
    """Seconds per component of one step (see the module docstring)."""
    student, teacher_cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(), TEACHERS[teacher]()
    n = target.num_devices
    flops_rate = n * target.peak_bf16_flops * mfu
    rows, total = PROMPTS * ROLLOUTS, PROMPT_LEN + response
    patches = [IMAGE_TOKENS * student.vision.merge_unit] * PROMPTS  # one image per prompt, encoded per prompt
    prefill = device_bench.forward_flops(student, [PROMPT_LEN] * PROMPTS, logit_positions=PROMPTS,
                                         patches_per_image=patches)
    mean_context = PROMPT_LEN + response / 2
    step_flops = decode_step_flops(student, rows, mean_context) / n
    step_s = max(decode_bytes_per_step / (target.hbm_bandwidth * hbm_eff),
                 step_flops / (target.peak_bf16_flops * mfu)) + overhead_us * 1e-6
    teacher_flops = 2 * device_bench.forward_flops(teacher_cfg, [total] * rows, logit_positions=rows * response,
                                                   patches_per_image=patches)
    student_flops = 4 * device_bench.forward_flops(student, [total] * rows, logit_positions=rows * response,
                                                   patches_per_image=patches)
    logits_bytes = 6 * rows * response * student.text.vocab_size * 4
    n_student = device_bench.text_matmul_params(student) + student.text.vocab_size * student.text.hidden_size
    optimizer_bytes = 28 * n_student
    bandwidth = n * target.hbm_bandwidth * hbm_eff
    parts = {
        "rollout prefill": prefill / flops_rate,
        "rollout decode": response * step_s,
        "teacher passes (2 views)": teacher_flops / flops_rate,
        "student fwd + bwd (remat)": student_flops / flops_rate,
        "KL / softmax (fp32 logits)": logits_bytes / bandwidth,
        "optimizer (AdamW)": optimizer_bytes / bandwidth,
    }
    return {"parts": parts, "total": sum(parts.values()), "decode_step_ms": step_s * 1e3,
            "decode_step_bytes": decode_bytes_per_step, "flops": {"prefill": prefill, "teacher": teacher_flops,
                                                                  "student": student_flops}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="h100x8,a100x8,v6e-8")
    p.add_argument("--teachers", default="8b,32b")
    p.add_argument("--responses", default="2048,4096")
    p.add_argument("--mfu", type=float, default=0.45, help="fraction of peak bf16 FLOP/s reached by matmul work")
    p.add_argument("--hbm-eff", type=float, default=0.75, help="fraction of HBM bandwidth reached by decode/KL")
    p.add_argument("--step-overhead-us", type=float, default=300.0, help="fixed cost per decode step (launches)")
    p.add_argument("--decode-bytes", choices=("compiler", "analytic"), default="compiler")
    p.add_argument("--bytes-from", default="v6e-8", help="TPU target whose compile gives the decode bytes")
    p.add_argument("--decode-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the sampler's parameter dtype (float32: the train state's master params, as today)")
    p.add_argument("--rollout-mesh", choices=("fsdp", "tensor"), default="fsdp",
                   help="the sampler's mesh for the decode bytes: fsdp (today: the train mesh) or tensor=8")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    responses = [int(x) for x in args.responses.split(",")]
    print(f"PROJECTED step time (not measured; load {load:.1f}): assumptions MFU {args.mfu:.0%} of peak bf16, "
          f"{args.hbm_eff:.0%} of HBM bandwidth, {args.step_overhead_us:.0f} us per decode step, collectives "
          f"overlapped, every rollout to its full length")
    decode_bytes = {}
    for response in responses:
        context = int(PROMPT_LEN + response / 2)
        if args.decode_bytes == "compiler":
            compiled, least = compiled_decode_bytes(args.bytes_from, context, response, args.rollout_mesh,
                                                    args.decode_dtype)
            print(f"  decode step at the mean context {context} ({args.bytes_from} compile, rollout mesh "
                  f"{args.rollout_mesh}, {args.decode_dtype} params): bytes accessed "
                  f"{compiled / 1e9:.2f} GB per device; the least it must read {least / 1e9:.2f} GB -> "
                  f"{least / compiled:.0%} of the HBM roofline", flush=True)
            decode_bytes[response] = compiled
        else:
            cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b()
            weights, kv = device_bench.decode_bytes_per_step(cfg, PROMPTS * ROLLOUTS, context)
            decode_bytes[response] = (weights if args.rollout_mesh == "fsdp" else weights / 8) + kv / 8
    for name in args.targets.split(","):
        target = targets_lib.get(name)
        print(f"\n{target.label}: {target.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {target.hbm_bandwidth / 1e9:,.0f} "
              f"GB/s per device ({target.source})")
        print("| teacher | response | " + " | ".join(project(target, "8b", 2048, mfu=args.mfu, hbm_eff=args.hbm_eff,
                                                         overhead_us=0, decode_bytes_per_step=1)["parts"])
              + " | total s | vs release 105 s (8xA100) |")
        print("|---|---|" + "---|" * 8)
        for teacher in args.teachers.split(","):
            for response in responses:
                out = project(target, teacher, response, mfu=args.mfu, hbm_eff=args.hbm_eff,
                              overhead_us=args.step_overhead_us, decode_bytes_per_step=decode_bytes[response])
                cells = " | ".join(f"{v:.1f}" for v in out["parts"].values())
                print(f"| {teacher.upper()} | {response:,} | {cells} | **{out['total']:.1f}** | "
                      f"{RELEASE_S_PER_STEP / out['total']:.1f}x faster (decode step {out['decode_step_ms']:.2f} "
                      f"ms) |", flush=True)


if __name__ == "__main__":
    main()
