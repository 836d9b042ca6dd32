"""Train-step benchmark: the fused JAX VA-OPD step against an eager PyTorch step, and ahead-of-time memory of
the paper-scale step on a simulated 8-device mesh with the micro-batch each teacher needs.

    python -m vaopd_jax.bench.step                       # all parts (the AOT table takes ~30 min on 2 CPU cores)
    python -m vaopd_jax.bench.step --part torch          # 1. JAX vs eager PyTorch, same config/batch/weights
    python -m vaopd_jax.bench.step --part aot --target h100x8   # 2. the AOT table compiled by the GPU compiler
    python -m vaopd_jax.bench.step --part aot --target v6e-8 --teachers 8b --responses 4096   # by libtpu
    python -m vaopd_jax.bench.step --part table --hardware h100x8,a100x8,v5p-8,v6e-8 --json T.json  # paper.py's
    python -m vaopd_jax.bench.step --part aot            # the CPU backend (simulated devices; upper bounds)
    python -m vaopd_jax.bench.step --part aot --teachers 8b --responses 4096 --micro-batch 32   # one compile
    python -m vaopd_jax.bench.step --part aot --teachers 30b-a3b --responses 4096 --meshes 1,1,8,1   # MoE, expert=8
    XLA_FLAGS=--xla_force_host_platform_device_count=32 python -m vaopd_jax.bench.step --part aot \
        --teachers 235b-a22b --responses 4096 --meshes 1,1,32,1                   # 235B-A22B over 4 x 8 devices
    python -m vaopd_jax.bench.step --part layer          # 2a. one decoder layer: where the memory goes

1. Step time: the jitted step (teacher on both views, VA, weights, groups, chunked KL, grad, clip, AdamW) vs
   the same step written in eager PyTorch over transformers' Qwen3VLForConditionalGeneration (student and
   teacher), same small config, same weights, same batch, same process, CPU, fp32. JAX and torch steps are
   interleaved so machine load hits both; prints the median step times, the ratio and the two first-step losses.
2. AOT: --target (vaopd_jax/parallel/targets.py: h100x8, a100x8, v5p-8, v6e-8, v5e-8, multi-host variants,
   cpu) picks the compiler and the devices of the mesh; every compile prints one `... peak <X> GB ...` line with
   the device kind, per-device bytes, the card's HBM and fits / margin (docs/performance.md). The figures below
   are the CPU backend's. The paper-scale step (2B student with fp32 master params / bf16 compute, 4B / 8B / 32B bf16 teacher or the
   mixture-of-experts 30B-A3B / 235B-A22B one, 16 prompts x 4 rollouts, 1,024 prompt tokens of which 768 are one
   image, --responses tokens, KL chunk 512 as configs/base.py) lowered from abstract shapes (no weights allocated)
   with ShapeDtypeStructs carrying the shardings of a simulated (data, fsdp, tensor) or (data, fsdp, expert, tensor)
   mesh, compiled, and XLA's per-device memory analysis printed: argument, output, alias, temp bytes and the peak
   argument + output - alias + temp. For each teacher x response x mesh the table tries micro-batches of 64, 32, 16,
   8 rollouts (`train.micro_batch_rollouts`), largest first, one compile at a time, and keeps the first whose peak is
   within 72 GB (80 GB less 10 % headroom for what the analysis does not see); then prints one markdown table. XLA's
   CPU backend has no bf16 matmul: it converts the teacher's bf16 weights to f32 and hoists those copies out of the
   layer loop, which a GPU/TPU does not do, so these peaks are upper bounds (32B teacher, response 4,096, 32 rollouts
   per micro-batch: 66.4 GB; with XLA_FLAGS=--xla_disable_hlo_passes=while-loop-invariant-code-motion, which keeps
   those copies inside the loop, one layer at a time, 45.6 GB). Student and teacher use --attention (default
   'chunked': models/qwen3_vl/attention.py, no T x T scores); 'xla' is the dense path that materializes (rows, heads,
   T, T) fp32 scores per layer. MoE teachers use the tiled grouped GEMM (models/qwen3_vl/grouped.py, the GPU path)
   and expert parallelism over the mesh's 'expert' axis (models/qwen3_vl/moe.py; on the dense parts that axis is one
   more FSDP axis, so fsdp=8 and expert=8 shard the 2B student alike).
   2a. `--part layer`: one 2B decoder layer, forward + backward, compiled at one device's share of the paper
   batch (8 rows x 5,120 tokens), for attention xla vs chunked: temp bytes against the size of one
   (rows, heads, T, T) fp32 score matrix, which is what the full step's temp memory tracks.
3. MFU needs a GPU/TPU; on CPU it is not measured (`python -m vaopd_jax.bench.device` measures it there).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # The AOT part compiles for a simulated 8-device CPU mesh (must be set before JAX starts).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vaopd_jax.distill import batch as train_batch_lib
from vaopd_jax.distill import state as state_lib
from vaopd_jax.distill import step as step_lib
from vaopd_jax.data import batch as batch_lib
from vaopd_jax.distill.batch import TrainBatch, build_train_batch
from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import testing
from vaopd_jax.bench import aot
from vaopd_jax.parallel import targets as targets_lib
from vaopd_jax.parallel.mesh import MESH_AXES

GB = 1e9
TEACHERS = {"4b": qwen3_vl.Qwen3VLConfig.qwen3_vl_4b, "8b": qwen3_vl.Qwen3VLConfig.qwen3_vl_8b,
            "32b": qwen3_vl.Qwen3VLConfig.qwen3_vl_32b, "30b-a3b": qwen3_vl.Qwen3VLConfig.qwen3_vl_30b_a3b,
            "235b-a22b": qwen3_vl.Qwen3VLConfig.qwen3_vl_235b_a22b}
MICRO_BATCH_CANDIDATES = (64, 32, 16, 8)  # rollouts per micro-batch for 16 prompts x 4: whole prompts, fsdp=8 rows
PAPER_KL_CHUNK = 512  # configs/base.py model.kl_chunk_size


# ----------------------------------------------------------------------------- 1. JAX vs eager PyTorch
def small_config() -> qwen3_vl.Qwen3VLConfig:
    """~10M params: 4 text layers x 256 wide, 8k vocab, 2-block vision tower with one deepstack merger."""
    return qwen3_vl.Qwen3VLConfig.tiny(
        text=dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, mrope_section=(16, 8, 8)),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, num_position_embeddings=256,
                    deepstack_visual_indexes=(0,)),
        image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003)


def _torch_batch(prompts, batch: TrainBatch, num_rollouts: int, cfg):
    """The same rows for transformers: images repeated per rollout (transformers' forward runs them per row)."""
    import torch

    grids = prompts.image_grid_thw[:, 0]  # one image per prompt
    patches = np.prod(grids, axis=1)
    rows_pix = lambda pixels: np.concatenate([pixels[p, :patches[p]]  # noqa: E731
                                              for p in range(len(grids)) for _ in range(num_rollouts)])
    grid_rows = np.repeat(grids, num_rollouts, axis=0)
    common = dict(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                  attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
                  image_grid_thw=torch.tensor(grid_rows),
                  mm_token_type_ids=torch.tensor((batch.input_ids == cfg.image_token_id).astype(np.int32)))
    return (dict(common, pixel_values=torch.tensor(rows_pix(prompts.pixel_values))),
            dict(common, pixel_values=torch.tensor(rows_pix(prompts.pixel_values_pixelated))))


def torch_va_opd_step(student, teacher, optimizer, inputs_orig, inputs_pix, batch: TrainBatch, num_rollouts: int,
                      high_fraction=0.2, high_weight=0.5, eps=1e-6, clip=1.0):
    """One eager VA-OPD step in PyTorch (docs/method.md Eq. 1-6), full-vocabulary logits materialized."""
    import torch

    pos = torch.tensor(batch.response_positions, dtype=torch.long)
    tokens = torch.tensor(batch.response_tokens, dtype=torch.long)
    mask = torch.tensor(batch.response_mask)
    take = lambda logits: torch.gather(logits, 1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    with torch.no_grad():
        logp_t = torch.log_softmax(take(teacher(**inputs_orig).logits).float(), -1)
        logp_p = torch.log_softmax(take(teacher(**inputs_pix).logits).float(), -1)
    logp_s = torch.log_softmax(take(student(**inputs_orig).logits).float(), -1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    pick = lambda lp: torch.gather(lp, -1, tokens[..., None])[..., 0]
    va = torch.clamp(pick(logp_t) - pick(logp_p), min=0.0) * mask
    counts = mask.sum(-1)
    mean_va = (va.sum(-1) / counts.clamp(min=1)).view(-1, num_rollouts)
    z = (mean_va - mean_va.mean(-1, keepdim=True)) / (mean_va.std(-1, unbiased=False, keepdim=True) + eps)
    weights = torch.softmax(z, -1).view(-1)
    key = torch.where(mask > 0, -va, torch.full_like(va, float("inf")))
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(va.shape[1]).expand_as(order))
    n_high = torch.clamp(torch.ceil(high_fraction * counts - 1e-4), min=1.0)
    high = (rank < n_high[:, None]) & (mask > 0)
    n_low = counts - n_high
    high_coeff = torch.where(n_low > 0, high_weight, 1.0) / n_high
    coeff = torch.where(high, high_coeff[:, None], ((1 - high_weight) / n_low.clamp(min=1))[:, None]) * mask
    loss = (coeff * weights[:, None] * kl).sum() / (va.shape[0] // num_rollouts)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def bench_vs_torch(num_steps: int, num_prompts: int, num_rollouts: int, response_len: int, image: int):
    import torch

    cfg = small_config()
    torch_teacher = testing.hf_reference_model(cfg, seed=1)
    torch_student = testing.hf_reference_model(cfg, seed=2)
    teacher = testing.model_from_hf(torch_teacher, cfg)
    student = testing.model_from_hf(torch_student, cfg)
    for p in torch_teacher.parameters():
        p.requires_grad_(False)
    torch_student.train()  # no dropout in Qwen3-VL; gradients on

    pb = testing.make_batch(cfg, [[(1, image, image)]] * num_prompts, [8] * num_prompts, seed=0)
    rng = np.random.default_rng(0)
    prompts = batch_lib.from_flat(pb.input_ids, pb.attention_mask, pb.pixel_values, pb.image_grid_thw, cfg,
                                  pixel_values_pixelated=rng.standard_normal(pb.pixel_values.shape).astype(np.float32))
    rows = num_prompts * num_rollouts
    tokens = rng.integers(0, 7999, (rows, response_len)).astype(np.int32)
    lengths = rng.integers(response_len // 2, response_len + 1, rows)
    mask = (np.arange(response_len)[None] < lengths[:, None]).astype(np.float32)
    batch = build_train_batch(prompts, tokens, mask, num_rollouts, cfg)

    lr = 1e-5
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1))
    state = state_lib.create_train_state(student, optimizer, jax.random.key(0), remat="none")
    teacher_graphdef, teacher_params = state_lib.split_teacher(teacher)
    config = step_lib.StepConfig(num_rollouts=num_rollouts, kl_chunk_size=64)
    train_step = step_lib.make_train_step(config, teacher_graphdef, optimizer)
    device_batch = train_batch_lib.shard_batch(batch)
    torch_opt = torch.optim.AdamW(torch_student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    inputs_orig, inputs_pix = _torch_batch(prompts, batch, num_rollouts, cfg)

    t0 = time.perf_counter()
    state, metrics = train_step(state, teacher_params, device_batch, jax.random.key(0))
    jax_first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    torch_first_loss = torch_va_opd_step(torch_student, torch_teacher, torch_opt, inputs_orig, inputs_pix, batch,
                                         num_rollouts)
    jax_times, torch_times = [], []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        state, metrics = train_step(state, teacher_params, device_batch, jax.random.key(0))
        jax.block_until_ready(metrics)
        jax_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_va_opd_step(torch_student, torch_teacher, torch_opt, inputs_orig, inputs_pix, batch, num_rollouts)
        torch_times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    print(f"== 1. step time, CPU fp32, {n_params / 1e6:.1f}M-param student and teacher, {num_prompts} prompts x "
          f"{num_rollouts} rollouts, sequence {batch.input_ids.shape[1]} (response {response_len}), "
          f"vocab {cfg.text.vocab_size}, torch threads {torch.get_num_threads()}")
    print(f"first-step loss: JAX {jax_first_loss:.6f}  PyTorch {torch_first_loss:.6f}  "
          f"|diff| {abs(jax_first_loss - torch_first_loss):.2e}")
    print(f"JAX compile + first step: {compile_s:.1f} s")
    print(f"median step over {num_steps}: JAX {jax_s * 1e3:.0f} ms   PyTorch eager {torch_s * 1e3:.0f} ms   "
          f"ratio {torch_s / jax_s:.2f}x")


# ----------------------------------------------------------------------------- 2. AOT at paper scale
_abstract_model = aot.abstract_model


def _abstract_batch(cfg, mesh, num_prompts, num_rollouts, prompt_len, response_len, image_tokens):
    rows, total = num_prompts * num_rollouts, prompt_len + response_len
    patches = image_tokens * cfg.vision.merge_unit
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    vision = qwen3_vl.VisionInputs(
        rotary_pos=sds((num_prompts, patches, 2), jnp.int32), interp_indices=sds((num_prompts, patches, 4), jnp.int32),
        interp_weights=sds((num_prompts, patches, 4), jnp.float32), segment_ids=sds((num_prompts, patches), jnp.int32),
        valid=sds((num_prompts, patches), jnp.bool_), merged_valid=sds((num_prompts, image_tokens), jnp.bool_))
    batch = TrainBatch(
        input_ids=sds((rows, total), jnp.int32), attention_mask=sds((rows, total), jnp.int32),
        position_ids=sds((3, rows, total), jnp.int32), response_positions=sds((rows, response_len), jnp.int32),
        response_tokens=sds((rows, response_len), jnp.int32), response_mask=sds((rows, response_len), jnp.float32),
        sampler_logprobs=sds((rows, response_len), jnp.float32),
        pixel_values=sds((num_prompts, patches, cfg.vision.patch_dim), jnp.float32),
        pixel_values_pixelated=sds((num_prompts, patches, cfg.vision.patch_dim), jnp.float32),
        vision_inputs=vision, image_rows=sds((rows * image_tokens,), jnp.int32), num_truncated=sds((), jnp.int32))
    specs = train_batch_lib.batch_partition_specs(batch, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        batch, specs)


def layer_report(attention: str, *, rows=8, seq_len=5120, chunk_size=512):
    """Compiles grad of one 2B decoder layer (bf16, causal + padding mask) on one device; prints temp bytes."""
    from vaopd_jax.models.qwen3_vl.attention import MaskSpec
    from vaopd_jax.models.qwen3_vl.text import decoder_layer

    cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(attention_impl=attention, attention_chunk_size=chunk_size)
    t = cfg.text
    model = nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    layer_params = {name: jax.ShapeDtypeStruct(v.shape[1:], v.dtype)  # one layer's slice of the stacked params
                    for name, v in vars(model.language_model.layers).items() if isinstance(v, nnx.Param)}
    sds = jax.ShapeDtypeStruct
    x = sds((rows, seq_len, t.hidden_size), jnp.bfloat16)
    cos = sds((rows, seq_len, t.head_dim), jnp.float32)
    valid = sds((rows, seq_len), jnp.bool_)

    def loss(p, x, cos, valid):
        mask = MaskSpec(key_valid=valid, causal=True)
        if attention == "xla":
            mask = mask.dense(rows, seq_len, seq_len)
        out, _ = decoder_layer(p, x, cos, cos, mask, cfg, jnp.bfloat16)
        return jnp.sum(out.astype(jnp.float32))

    mem = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(layer_params, x, cos, valid).compile().memory_analysis()
    scores = rows * t.num_attention_heads * seq_len * seq_len * 4
    print(f"  one 2B decoder layer fwd+bwd, {rows} rows x {seq_len} tokens, attention={attention}"
          f"{f' (chunk {chunk_size})' if attention == 'chunked' else ''}: temp {mem.temp_size_in_bytes / GB:.2f} GB "
          f"(one (rows, heads, T, T) fp32 score matrix: {scores / GB:.2f} GB)", flush=True)
    return mem


def train_step_lowering(student_cfg, teacher_cfg, mesh: Mesh, *, num_prompts=16, num_rollouts=4, prompt_len=1024,
                        response_len=2048, image_tokens=768, kl_chunk_size=PAPER_KL_CHUNK, vocab_valid=151_669,
                        micro_batch_rollouts=None):
    """A closure lowering the fused train step (the trainer's `distill.step.make_train_step`) from abstract
    sharded shapes over `mesh`: student fp32 master params / bf16 compute / block remat, bf16 teacher."""
    student_graphdef, student_params = _abstract_model(student_cfg, jnp.float32, jnp.bfloat16, "block", mesh)
    teacher_graphdef, teacher_params = _abstract_model(teacher_cfg, jnp.bfloat16, jnp.bfloat16, "none", mesh)
    optimizer = state_lib.make_optimizer(1e-6, total_steps=1000)
    shardings = state_lib.abstract_train_state_sharding(optimizer, student_params, student_graphdef, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, student_params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    replicated = NamedSharding(mesh, PartitionSpec())
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = state_lib.TrainState(
        params=student_params, opt_state=jax.tree.map(with_sharding, abstract_opt, shardings.opt_state),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated), graphdef=student_graphdef)
    batch = _abstract_batch(teacher_cfg, mesh, num_prompts, num_rollouts, prompt_len, response_len, image_tokens)
    config = step_lib.StepConfig(num_rollouts=num_rollouts, kl_chunk_size=kl_chunk_size, valid_vocab_size=vocab_valid,
                                 micro_batch_rollouts=micro_batch_rollouts)
    train_step = step_lib.make_train_step(config, teacher_graphdef, optimizer, mesh=mesh, state_sharding=shardings)
    # make_train_step traces under jax.set_mesh(mesh) (parallel.mesh.on_mesh): without it the activation
    # constraints are no-ops and GSPMD replicates the teacher's MLP activations on every device.
    return lambda: train_step.lower(state, teacher_params, batch,
                                    jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))


def aot_report(teacher_name: str, response_len: int, mesh: Mesh, *, num_prompts=16, num_rollouts=4,
               prompt_len=1024, image_tokens=768, kl_chunk_size=PAPER_KL_CHUNK, vocab_valid=151_669,
               attention="chunked", attention_chunk_size=512, micro_batch_rollouts=None, target=None):
    """Lowers and compiles the paper-scale step from abstract shapes for `target` (default: the CPU backend over
    `mesh`'s simulated devices); prints the target compiler's per-device memory, one `... peak <X> GB ...` line."""
    target = target or targets_lib.get("cpu")
    options = dict(attention_impl=attention, attention_chunk_size=attention_chunk_size)
    student_cfg = qwen3_vl.Qwen3VLConfig.qwen3_vl_2b(**options)
    teacher_cfg = TEACHERS[teacher_name](**options)
    lower = train_step_lowering(student_cfg, teacher_cfg, mesh, num_prompts=num_prompts, num_rollouts=num_rollouts,
                                prompt_len=prompt_len, response_len=response_len, image_tokens=image_tokens,
                                kl_chunk_size=kl_chunk_size, vocab_valid=vocab_valid,
                                micro_batch_rollouts=micro_batch_rollouts)
    micro = micro_batch_rollouts or num_prompts * num_rollouts
    print(f"2B student <- {teacher_name.upper()} teacher, {num_prompts}x{num_rollouts} rollouts, prompt {prompt_len} "
          f"+ response {response_len}, target {target.label}, mesh {_mesh_text(mesh)}, attention {attention}"
          f"{f' (chunk {attention_chunk_size})' if attention == 'chunked' else ''}, micro-batch {micro}, KL chunk "
          f"{kl_chunk_size}", flush=True)
    mem, _, lower_s, compile_s = aot.compile_program("train step", lower, target)
    return {"peak": mem.peak / GB, "arguments": mem.arguments / GB, "temp": mem.temp / GB, "fits": mem.fits,
            "compile_s": compile_s, "lower_s": lower_s, "memory": mem}


def aot_table(teachers, responses, meshes, *, candidates=MICRO_BATCH_CANDIDATES, target=None, **kwargs) -> list:
    """For each teacher x response x mesh: the largest micro-batch (rollouts, from `candidates`, largest first)
    whose per-device peak on `target` is within its budget (HBM less targets.HEADROOM). One compile per tried
    micro-batch, one at a time; prints each compile as it goes, then one table. Returns the table's rows."""
    target = target or targets_lib.get("cpu")
    budget_gb = target.budget_bytes / GB
    rows = []
    for mesh in meshes:
        for teacher in teachers:
            for response in responses:
                tried = []
                for micro in candidates:
                    tried.append((micro, aot_report(teacher, response, mesh, micro_batch_rollouts=micro,
                                                    target=target, **kwargs)))
                    if tried[-1][1]["fits"]:
                        break
                rows.append({"teacher": teacher, "response": response, "mesh": _mesh_text(mesh), "tried": tried,
                             "fits": tried[-1][1]["fits"], "target": target.name})
    total = 16 * 4
    print(f"\n{target.label}: 2B student, 16 prompts x 4 rollouts, prompt 1,024 tokens (768 image tokens) + "
          f"response; bf16 teacher, fp32 master student with bf16 compute and block remat; chunked attention; "
          f"per-device peak (arguments + outputs - aliased + temp + code) from the {target.platform} compiler; "
          f"micro-batch = the largest within {budget_gb:.1f} GB ({target.hbm_bytes / GB:.1f} GB less "
          f"{targets_lib.HEADROOM:.0%} headroom)")
    print("| target | teacher | response | mesh | micro-batch (rollouts) | peak GB / device | arguments GB | temp GB "
          "| larger micro-batches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        micro, mem = row["tried"][-1]
        chosen = f"{micro} ({total // micro} micro-batch{'es' if total // micro > 1 else ''})" if row["fits"] else \
            f"none of {list(candidates)} fits"
        larger = ", ".join(f"{m}: {r['peak']:.1f} GB" for m, r in row["tried"][:-1]) or "-"
        print(f"| {target.name} | {row['teacher'].upper()} | {row['response']:,} | {row['mesh']} | {chosen} | "
              f"{mem['peak']:.1f} | {mem['arguments']:.1f} | {mem['temp']:.1f} | {larger} |", flush=True)
    return rows


def simulated_mesh(text: str, target=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over the target's devices (default: simulated CPU devices) from
    'data,fsdp,tensor' (expert = 1) or 'data,fsdp,expert,tensor'; -1 takes the remaining devices."""
    target = target or targets_lib.get("cpu")
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (3, 4) or min(sizes) < -1 or 0 in sizes:
        raise SystemExit(f"--meshes {text!r}: expected data,fsdp,tensor or data,fsdp,expert,tensor positive sizes "
                         "(one may be -1: all remaining devices)")
    if len(sizes) == 3:
        sizes = sizes[:2] + [1] + sizes[2:]
    data, fsdp, expert, tensor = sizes
    if target.platform != "cpu":
        try:
            return targets_lib.make_mesh(target, data=data, fsdp=fsdp, expert=expert, tensor=tensor)
        except ValueError as e:
            raise SystemExit(f"--meshes {text} on --target {target.name} ({target.num_devices} devices): {e}")
    cpus = jax.devices("cpu")
    known = int(np.prod([x for x in sizes if x != -1]))
    sizes = [x if x != -1 else max(len(cpus) // known, 1) for x in sizes]
    count = int(np.prod(sizes))
    if count > len(cpus):
        raise SystemExit(f"--meshes {text}: needs {count} devices, {len(cpus)} simulated; set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N")
    return Mesh(np.asarray(cpus[:count]).reshape(sizes), MESH_AXES)


# Hardware families of the sizing table (configs/paper.py HARDWARE): one host first, then more hosts of the same
# card when no micro-batch fits one host.
HARDWARE_LADDERS = {"h100x8": ("h100x8", "h100x16", "h100x32"), "a100x8": ("a100x8", "a100x16", "a100x32"),
                    "v5p-8": ("v5p-8", "v5p-16", "v5p-32", "v5p-64"),
                    "v6e-8": ("v6e-8", "v6e-16", "v6e-32", "v6e-64"),
                    "v5e-8": ("v5e-8", "v5e-16", "v5e-32", "v5e-64")}


def state_bytes_per_device(teacher: str, devices: int) -> float:
    """A lower bound of the step's per-device arguments: bf16 teacher + fp32 student with AdamW's two moments,
    all sharded over `devices` (the weights alone; the step's temporaries come on top)."""
    count = lambda cfg: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(  # noqa: E731
        nnx.eval_shape(lambda: qwen3_vl.Qwen3VL(cfg, rngs=nnx.Rngs(0))), nnx.Param)))
    return (2 * count(TEACHERS[teacher]()) + 12 * count(qwen3_vl.Qwen3VLConfig.qwen3_vl_2b())) / devices


def sizing_table(hardware: list[str], teachers, responses, *, json_path: str = "", **kwargs) -> list:
    """configs/paper.py's table: for each hardware family x teacher x response, the fewest hosts and the largest
    micro-batch (64, 32, 16, 8 rollouts, at least one row per device) whose target-compiled peak per device is
    within the card's budget. A host count whose weights alone exceed the budget is skipped without compiling.
    Writes every compile to `json_path` as it goes (rerunning resumes from it)."""
    import json

    done = {}
    if json_path and os.path.exists(json_path):
        with open(json_path) as f:
            done = {(r["hardware"], r["teacher"], r["response"]): r for r in json.load(f)}
    rows = list(done.values())
    for family in hardware:
        for teacher in teachers:
            for response in responses:
                if (family, teacher, response) in done:
                    continue
                row = {"hardware": family, "teacher": teacher, "response": response, "tried": [], "fits": False}
                for name in HARDWARE_LADDERS[family]:
                    target = targets_lib.get(name)
                    floor = state_bytes_per_device(teacher, target.num_devices)
                    if floor > target.budget_bytes:
                        row["tried"].append({"target": name, "skipped": f"weights + optimizer state alone "
                                             f"{floor / GB:.1f} GB per device"})
                        continue
                    moe = TEACHERS[teacher]().text.is_moe
                    mesh = targets_lib.make_mesh(target, fsdp=1 if moe else -1, expert=-1 if moe else 1)
                    for micro in [m for m in MICRO_BATCH_CANDIDATES if m >= target.num_devices]:
                        result = aot_report(teacher, response, mesh, micro_batch_rollouts=micro, target=target,
                                            **kwargs)
                        row["tried"].append({"target": name, "mesh": _mesh_text(mesh), "micro": micro,
                                             "peak_gb": round(result["peak"], 2), "fits": result["fits"],
                                             "arguments_gb": round(result["arguments"], 2),
                                             "temp_gb": round(result["temp"], 2),
                                             "compile_s": round(result["compile_s"])})
                        if result["fits"]:
                            break
                    if row["tried"][-1].get("fits"):
                        row.update(fits=True, target=name, mesh=_mesh_text(mesh), micro=row["tried"][-1]["micro"],
                                   peak_gb=row["tried"][-1]["peak_gb"], budget_gb=round(target.budget_bytes / GB, 1))
                        break
                rows.append(row)
                if json_path:
                    with open(json_path, "w") as f:
                        json.dump(rows, f, indent=1)
    print("| hardware | teacher | response | target (hosts) | mesh | micro-batch (rollouts) | peak GB / device "
          "| budget GB | larger micro-batches / fewer hosts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        tried = [f"{t['target']} {t['micro']}: {t['peak_gb']:.1f} GB" if "micro" in t else f"{t['target']}: skipped"
                 for t in row["tried"][:-1]]
        if row["fits"]:
            target = targets_lib.get(row["target"])
            print(f"| {row['hardware']} | {row['teacher'].upper()} | {row['response']:,} | {row['target']} "
                  f"({target.hosts}) | {row['mesh']} | {row['micro']} | {row['peak_gb']:.1f} | {row['budget_gb']} | "
                  f"{', '.join(tried) or '-'} |")
        else:
            print(f"| {row['hardware']} | {row['teacher'].upper()} | {row['response']:,} | none fits | - | - | - | - | "
                  f"{', '.join(tried) or '-'} |")
    return rows


def _mesh_text(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("torch", "aot", "layer", "table", "all"), default="all")
    parser.add_argument("--hardware", default="h100x8,a100x8,v5p-8,v6e-8",
                        help=f"--part table: comma list of {', '.join(HARDWARE_LADDERS)}")
    parser.add_argument("--json", default="", help="--part table: write (and resume from) this JSON file")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation (part 1)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--response", type=int, default=128, help="response length (part 1)")
    parser.add_argument("--image", type=int, default=8, help="image side in patches (part 1)")
    parser.add_argument("--teachers", default="4b,8b,32b", help=f"comma list of {'/'.join(TEACHERS)} (part 2)")
    parser.add_argument("--responses", default="2048,4096", help="comma list of response lengths (part 2)")
    parser.add_argument("--target", default="cpu", help=f"part 2: compile for {', '.join(targets_lib.TARGETS)} "
                        "(GPU / TPU targets need the compile extras; 'cpu': XLA's CPU backend, simulated devices)")
    parser.add_argument("--meshes", default="1,-1,1", help="';'-separated data,fsdp,tensor or data,fsdp,expert,tensor "
                        "sizes (part 2; -1: the target's remaining devices; the cpu target with more than 8 devices "
                        "needs XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    parser.add_argument("--attention", default="chunked", choices=("chunked", "xla", "cudnn"),
                        help="attention_impl of student and teacher (part 2); 'cudnn' needs an NVIDIA GPU")
    parser.add_argument("--attention-chunk", type=int, default=512, help="query chunk of 'chunked' (parts 2, 2a)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="part 2: only this many rollouts per micro-batch (0: the table's search)")
    parser.add_argument("--kl-chunk", type=int, default=PAPER_KL_CHUNK, help="positions per KL chunk (part 2)")
    args = parser.parse_args(argv)
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices")
    if args.part in ("torch", "all"):
        bench_vs_torch(args.steps, args.prompts, args.rollouts, args.response, args.image)
    if args.part in ("layer", "all"):
        print("== 2a. where the memory goes: one decoder layer, forward + backward")
        for attention in ("xla", "chunked"):
            layer_report(attention, chunk_size=args.attention_chunk)
    if args.part == "table":
        print(f"== the sizing table of configs/paper.py (target compilers; load: {os.getloadavg()[0]:.1f})")
        sizing_table(args.hardware.split(","), [t.strip() for t in args.teachers.split(",")],
                     [int(x) for x in args.responses.split(",")], json_path=args.json, attention=args.attention,
                     attention_chunk_size=args.attention_chunk, kl_chunk_size=args.kl_chunk)
        return
    if args.part in ("aot", "all"):
        try:
            target = targets_lib.get(args.target)
            meshes = [simulated_mesh(text, target) for text in args.meshes.split(";")]
        except (ValueError, targets_lib.MissingExtra) as e:
            raise SystemExit(str(e))
        teachers = [t.strip() for t in args.teachers.split(",")]
        unknown = [t for t in teachers if t not in TEACHERS]
        if unknown:
            raise SystemExit(f"--teachers: {unknown} unknown; choose from {list(TEACHERS)}")
        responses = [int(x) for x in args.responses.split(",")]
        options = dict(attention=args.attention, attention_chunk_size=args.attention_chunk, kl_chunk_size=args.kl_chunk,
                       target=target)
        print(f"== 2. AOT compile from abstract shapes (no weights) for {target.label}, memory per device; "
              f"{target.source}")
        if args.micro_batch:
            for mesh in meshes:
                for teacher in teachers:
                    for response in responses:
                        aot_report(teacher, response, mesh, micro_batch_rollouts=args.micro_batch, **options)
        else:
            aot_table(teachers, responses, meshes, **options)
    print("== 3. MFU: needs a GPU/TPU (not measured on CPU)")


if __name__ == "__main__":
    main()
