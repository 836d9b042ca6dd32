"""Hugging Face safetensors <-> Flax NNX Qwen3-VL, streamed tensor by tensor and placed straight into the
target sharding.

    model = load_hf_checkpoint(path, dtype=jnp.bfloat16, mesh=None, rules=None)
    save_hf_checkpoint(model, path, dtype=None, max_shard_bytes=5 << 30)

The loader memory-maps each safetensors file (its own small reader: bf16 via ml_dtypes, no torch) and builds
every parameter with `jax.make_array_from_callback`, so each device shard reads only its slice of the file;
host memory holds at most one (stacked) parameter beyond the resulting model. The saver writes
`model.safetensors` (or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) and `config.json`
in the layout transformers' `Qwen3VLForConditionalGeneration.from_pretrained` reads.

Mixture-of-experts checkpoints (`Qwen3VLMoeForConditionalGeneration`) keep all experts of a layer in two fused
tensors: `mlp.experts.gate_up_proj` (gate rows first, then up) and `mlp.experts.down_proj`, plus the router
`mlp.gate.weight` (X, E). The released Qwen3-VL MoE files store them as (X, E, 2I) and (X, I, E); transformers >= 5
holds (and its save_pretrained writes) (X, 2I, E) and (X, E, I), and its loader transposes the released layout by
shape (conversion_mapping.py: Transpose(1, 2, check_dims=True)). The loader here reads both, by the same rule;
the saver writes the released layout, which every reader of the released files accepts (transformers 4.57 and 5),
except where the two layouts have the same shape (E == 2I or E == I) and only transformers >= 5's is unambiguous.

`python -m vaopd_jax.models.qwen3_vl.convert IN_DIR OUT_DIR [--dtype bfloat16]` round-trips a checkpoint
(load, then save) - e.g. to re-shard or change the dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import struct
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from .config import Qwen3VLConfig
from .model import Qwen3VL
from .sharding import logical_to_spec

_ST_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (missing / wrongly shaped tensor, wrong architecture)."""


# ----------------------------------------------------------------------------- parameter mapping
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one model parameter maps onto Hugging Face tensors.

    path: attribute path in the NNX module; keys: one HF key per stacked slice (a single key if unstacked);
    hf_shape: the HF tensor shape (transformers' in-memory layout); kind: 'copy', 'linear' (HF (out, in) ->
    kernel (in, ...out) reshaped), 'conv' (Conv3d (out, C, T, P, P) -> (C*T*P*P, out)), or one half of a fused
    expert tensor: 'expert_gate' / 'expert_up' (gate_up_proj (X, 2I, E) -> (X, E, I)), 'expert_down' (down_proj
    (X, E, I) -> (X, I, E)); expert tensors are also read in the released checkpoints' transposed layout.
    """

    path: tuple[str, ...]
    keys: tuple[str, ...]
    hf_shape: tuple[int, ...]
    kind: str
    stacked: bool


def param_specs(cfg: Qwen3VLConfig) -> list[ParamSpec]:
    t, v = cfg.text, cfg.vision
    E, F, N, K, D, V = (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
                        t.head_dim, t.vocab_size)
    VE, VF, E4 = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
    specs: list[ParamSpec] = []

    def add(path, key_fmt, hf_shape, kind, count=None):
        if count is None:
            specs.append(ParamSpec(tuple(path), (key_fmt,), tuple(hf_shape), kind, False))
        else:
            specs.append(ParamSpec(tuple(path), tuple(key_fmt.format(i) for i in range(count)), tuple(hf_shape),
                                   kind, True))

    lm = "model.language_model"
    L = t.num_hidden_layers
    add(("language_model", "embed_tokens"), f"{lm}.embed_tokens.weight", (V, E), "copy")
    add(("language_model", "norm"), f"{lm}.norm.weight", (E,), "copy")
    lay = ("language_model", "layers")
    add(lay + ("input_norm",), lm + ".layers.{}.input_layernorm.weight", (E,), "copy", L)
    add(lay + ("post_attention_norm",), lm + ".layers.{}.post_attention_layernorm.weight", (E,), "copy", L)
    add(lay + ("q_kernel",), lm + ".layers.{}.self_attn.q_proj.weight", (N * D, E), "linear", L)
    add(lay + ("k_kernel",), lm + ".layers.{}.self_attn.k_proj.weight", (K * D, E), "linear", L)
    add(lay + ("v_kernel",), lm + ".layers.{}.self_attn.v_proj.weight", (K * D, E), "linear", L)
    add(lay + ("o_kernel",), lm + ".layers.{}.self_attn.o_proj.weight", (E, N * D), "linear", L)
    add(lay + ("q_norm",), lm + ".layers.{}.self_attn.q_norm.weight", (D,), "copy", L)
    add(lay + ("k_norm",), lm + ".layers.{}.self_attn.k_norm.weight", (D,), "copy", L)
    # MLP stacks hold only their kind's layers (text.DecoderLayers): one key per layer of that kind, in order.
    sparse = t.sparse_layers
    dense_ids = [i for i in range(L) if not sparse[i]]
    sparse_ids = [i for i in range(L) if sparse[i]]

    def add_layers(name, key_fmt, hf_shape, kind, ids):
        specs.append(ParamSpec(lay + (name,), tuple(key_fmt.format(i) for i in ids), tuple(hf_shape), kind, True))

    if dense_ids:
        add_layers("gate_kernel", lm + ".layers.{}.mlp.gate_proj.weight", (F, E), "linear", dense_ids)
        add_layers("up_kernel", lm + ".layers.{}.mlp.up_proj.weight", (F, E), "linear", dense_ids)
        add_layers("down_kernel", lm + ".layers.{}.mlp.down_proj.weight", (E, F), "linear", dense_ids)
    if sparse_ids:
        X, I = t.num_experts, t.moe_intermediate_size
        add_layers("router_kernel", lm + ".layers.{}.mlp.gate.weight", (X, E), "linear", sparse_ids)
        add_layers("expert_gate_kernel", lm + ".layers.{}.mlp.experts.gate_up_proj", (X, 2 * I, E), "expert_gate",
                   sparse_ids)
        add_layers("expert_up_kernel", lm + ".layers.{}.mlp.experts.gate_up_proj", (X, 2 * I, E), "expert_up",
                   sparse_ids)
        add_layers("expert_down_kernel", lm + ".layers.{}.mlp.experts.down_proj", (X, E, I), "expert_down",
                   sparse_ids)
    if not cfg.tie_word_embeddings:
        add(("lm_head",), "lm_head.weight", (V, E), "linear")

    vis = "model.visual"
    add(("visual", "patch_kernel"), f"{vis}.patch_embed.proj.weight",
        (VE, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), "conv")
    add(("visual", "patch_bias"), f"{vis}.patch_embed.proj.bias", (VE,), "copy")
    add(("visual", "pos_embed"), f"{vis}.pos_embed.weight", (v.num_position_embeddings, VE), "copy")
    blk = ("visual", "blocks")
    B = v.depth
    for ours, theirs, shape, kind in (
            ("norm1_scale", "norm1.weight", (VE,), "copy"), ("norm1_bias", "norm1.bias", (VE,), "copy"),
            ("norm2_scale", "norm2.weight", (VE,), "copy"), ("norm2_bias", "norm2.bias", (VE,), "copy"),
            ("qkv_kernel", "attn.qkv.weight", (3 * VE, VE), "linear"), ("qkv_bias", "attn.qkv.bias", (3 * VE,), "copy"),
            ("proj_kernel", "attn.proj.weight", (VE, VE), "linear"), ("proj_bias", "attn.proj.bias", (VE,), "copy"),
            ("fc1_kernel", "mlp.linear_fc1.weight", (VF, VE), "linear"),
            ("fc1_bias", "mlp.linear_fc1.bias", (VF,), "copy"),
            ("fc2_kernel", "mlp.linear_fc2.weight", (VE, VF), "linear"),
            ("fc2_bias", "mlp.linear_fc2.bias", (VE,), "copy")):
        add(blk + (ours,), vis + ".blocks.{}." + theirs, shape, kind, B)
    mergers = [(("visual", "merger"), [f"{vis}.merger"], VE)]
    if v.deepstack_visual_indexes:
        mergers.append((("visual", "deepstack_mergers"),
                        [f"{vis}.deepstack_merger_list.{i}" for i in range(len(v.deepstack_visual_indexes))], E4))
    for path, prefixes, norm_dim in mergers:
        for ours, theirs, shape, kind in (
                ("norm_scale", "norm.weight", (norm_dim,), "copy"), ("norm_bias", "norm.bias", (norm_dim,), "copy"),
                ("fc1_kernel", "linear_fc1.weight", (E4, E4), "linear"),
                ("fc1_bias", "linear_fc1.bias", (E4,), "copy"),
                ("fc2_kernel", "linear_fc2.weight", (v.out_hidden_size, E4), "linear"),
                ("fc2_bias", "linear_fc2.bias", (v.out_hidden_size,), "copy")):
            specs.append(ParamSpec(path + (ours,), tuple(f"{p}.{theirs}" for p in prefixes), shape, kind, True))
    return specs


EXPERT_KINDS = ("expert_gate", "expert_up", "expert_down")


def released_expert_shape(spec: ParamSpec) -> tuple[int, ...]:
    """The released checkpoints' layout of a fused expert tensor: transformers' (X, a, b) transposed to (X, b, a)."""
    x, a, b = spec.hf_shape
    return (x, b, a)


def _transformers_layout(hf: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """A fused expert tensor in transformers' layout (X, 2I, E) / (X, E, I): as is when it has that shape (the
    rule of transformers' Transpose(check_dims=True)), else transposed from the released layout."""
    return hf if tuple(hf.shape) == spec.hf_shape else hf.transpose(0, 2, 1)


def hf_to_ours(hf: np.ndarray, spec: ParamSpec, slice_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> one (unstacked) slice of our parameter with shape slice_shape."""
    if spec.kind in EXPERT_KINDS:
        hf = _transformers_layout(hf, spec)
        if spec.kind == "expert_down":
            return hf.transpose(0, 2, 1)  # (X, E, I) -> (X, I, E)
        half = spec.hf_shape[1] // 2  # gate_up_proj rows: gate first, then up (transformers' chunk(2))
        part = hf[:, :half] if spec.kind == "expert_gate" else hf[:, half:]
        return part.transpose(0, 2, 1)  # (X, I, E) -> (X, E, I)
    if spec.kind == "copy":
        return hf.reshape(slice_shape)
    if spec.kind == "linear":
        return hf.T.reshape(slice_shape)
    if spec.kind == "conv":
        return hf.reshape(hf.shape[0], -1).T
    raise ValueError(spec.kind)


def ours_to_hf(ours: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """One (unstacked) slice of our parameter -> the HF tensor (spec.hf_shape; expert kinds: see
    experts_to_hf)."""
    if spec.kind == "expert_down":  # ours (X, I, E) -> transformers (X, E, I)
        return np.ascontiguousarray(ours.transpose(0, 2, 1))
    if spec.kind == "copy":
        return ours.reshape(spec.hf_shape)
    if spec.kind == "linear":
        out_dim, in_dim = spec.hf_shape
        return np.ascontiguousarray(ours.reshape(in_dim, out_dim).T)
    if spec.kind == "conv":
        return np.ascontiguousarray(ours.T).reshape(spec.hf_shape)
    raise ValueError(spec.kind)


def _get_param(model: nnx.Module, path: tuple[str, ...]) -> nnx.Param:
    obj = model
    for name in path:
        obj = getattr(obj, name)
    return obj


# ----------------------------------------------------------------------------- safetensors I/O
class SafetensorsFile:
    """A memory-mapped safetensors file: header parsed once, tensors read lazily (zero-copy views).

    `drop(key)` tells the kernel the process is done with a tensor's pages (madvise MADV_DONTNEED): they leave
    this process's resident set (the page cache keeps them), so streaming a checkpoint into device arrays does
    not end with the whole file resident beside the parameters (2x the parameters' bytes)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.offset = 8 + n
        header.pop("__metadata__", None)
        self.header = header
        self._mm = None

    def keys(self):
        return self.header.keys()

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        raw = np.frombuffer(self._map(), dtype=np.uint8, count=stop - start, offset=self.offset + start)
        return raw.view(dtype).reshape(info["shape"])

    def drop(self, key: str) -> None:
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, stop = self.header[key]["data_offsets"]
        first = (self.offset + start) // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants a page-aligned start
        self._mm.madvise(mmap.MADV_DONTNEED, first, self.offset + stop - first)


class CheckpointReader:
    """All tensors of a local HF checkpoint directory (single file or sharded index)."""

    def __init__(self, path: str):
        path = os.fspath(path)
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: SafetensorsFile(os.path.join(path, name)) for name in sorted(set(weight_map.values()))}
            self.where = {k: files[name] for k, name in weight_map.items()}
        elif os.path.exists(single):
            st = SafetensorsFile(single)
            self.where = {k: st for k in st.keys()}
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
        self.path = path

    def __contains__(self, key):
        return key in self.where

    def get(self, key: str) -> np.ndarray:
        if key not in self.where:
            raise CheckpointError(f"{self.path}: missing tensor {key!r}")
        return self.where[key].get(key)

    def drop(self, key: str) -> None:
        """Releases the resident pages of `key` (after its values were copied out)."""
        if key in self.where:
            self.where[key].drop(key)


def _checked(reader: Callable[[str], np.ndarray], key: str, spec: ParamSpec, where: str) -> np.ndarray:
    hf = reader(key)
    shape = tuple(hf.shape)
    if spec.kind in EXPERT_KINDS:
        allowed = (spec.hf_shape, released_expert_shape(spec))
        if shape not in allowed:
            if len(shape) == 3 and shape[0] != spec.hf_shape[0]:
                raise CheckpointError(f"{where}: tensor {key!r} holds {shape[0]} experts (shape {shape}), but the "
                                      f"config has num_experts={spec.hf_shape[0]}")
            raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, expected {allowed[0]} (transformers) "
                                  f"or {allowed[1]} (released checkpoints)")
        return hf
    if spec.kind == "linear" and key.endswith(".mlp.gate.weight") and len(shape) == 2 and shape[0] != spec.hf_shape[0]:
        raise CheckpointError(f"{where}: router {key!r} scores {shape[0]} experts (shape {shape}), but the config "
                              f"has num_experts={spec.hf_shape[0]}")
    if shape != spec.hf_shape:
        raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}, expected {spec.hf_shape}")
    return hf


def _build_param(spec: ParamSpec, shape, dtype, sharding, reader: Callable[[str], np.ndarray], where: str,
                 drop: Callable[[str], None] | None = None):
    """A jax.Array for one parameter, each device shard assembled from only the HF tensors it needs. drop(key):
    called once a tensor's values are copied out (the reader may release its pages)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    slice_shape = tuple(shape[1:]) if spec.stacked else tuple(shape)

    def slice_of(i: int) -> np.ndarray:
        key = spec.keys[i]
        return hf_to_ours(_checked(reader, key, spec, where), spec, slice_shape)

    def callback(index):
        if not spec.stacked:
            # A copy, never a view of the file: the array must not keep the mapped pages resident.
            out = np.array(slice_of(0)[index], dtype=np_dtype, copy=True)
            if drop is not None:
                drop(spec.keys[0])
            return out
        layers = range(*index[0].indices(shape[0]))
        block = None
        for j, i in enumerate(layers):  # fill in place: host memory holds one block, not a list plus a stack
            part = slice_of(i)[index[1:]]
            if block is None:
                block = np.empty((len(layers),) + part.shape, np_dtype)
            block[j] = part
            if drop is not None:
                drop(spec.keys[i])
        return block

    # Validate every tensor up front (cheap: header only) so errors name the tensor, not a device callback.
    for key in spec.keys:
        _checked(reader, key, spec, where)
    return jax.make_array_from_callback(tuple(shape), sharding, callback)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def model_from_tensors(cfg: Qwen3VLConfig, reader: Callable[[str], np.ndarray], *, dtype=jnp.float32,
                       compute_dtype=None, mesh: Mesh | None = None, rules: Mapping | None = None,
                       where: str = "checkpoint", drop: Callable[[str], None] | None = None) -> Qwen3VL:
    """Builds a Qwen3VL whose parameters come from `reader(hf_key) -> np.ndarray` (streamed, sharded);
    drop(hf_key), when given, is called once a tensor has been copied into its shards."""
    abstract = nnx.eval_shape(lambda: Qwen3VL(cfg, dtype, compute_dtype, rngs=nnx.Rngs(0)))
    for spec in param_specs(cfg):
        p = _get_param(abstract, spec.path)
        shape = tuple(p.shape)
        if mesh is None:
            sharding = _default_sharding()
        else:
            sharding = NamedSharding(mesh, logical_to_spec(p.get_metadata()["logical_axes"], rules, mesh, shape))
        p.set_value(_build_param(spec, shape, dtype, sharding, reader, where, drop))
    return abstract


def check_tensor_names(cfg: Qwen3VLConfig, names, where: str) -> None:
    """CheckpointError listing the tensors `cfg` needs that the checkpoint lacks and those it holds that `cfg`
    has no place for (a config.json of another size or depth, a file of another model), all at once.

    A tied model (tie_word_embeddings) may carry an lm_head.weight copy of the embedding: it is ignored.
    """
    expected = {key for spec in param_specs(cfg) for key in spec.keys}
    names = set(names)
    missing = sorted(expected - names)
    extra = sorted(names - expected - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if not missing and not extra:
        return
    parts = []
    for label, keys in (("missing", missing), ("extra", extra)):
        if keys:
            parts.append(f"{label} tensor " + ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
                         + f" ({len(keys)} {label}" + (", not used by this config" if label == "extra" else "") + ")")
    raise CheckpointError(f"{where}: its tensors do not match its config.json ({cfg.text.num_hidden_layers} text "
                          f"layers, {cfg.vision.depth} vision blocks, {len(cfg.vision.deepstack_visual_indexes)} "
                          f"deepstack mergers, tie_word_embeddings={cfg.tie_word_embeddings}): " + "; ".join(parts))


def _check_architecture(config_dict: dict, where: str):
    mt = config_dict.get("model_type")
    if mt not in ("qwen3_vl", "qwen3_vl_moe"):
        raise CheckpointError(f"{where}: unsupported model_type {mt!r} (expected 'qwen3_vl', "
                              "Qwen3VLForConditionalGeneration, or 'qwen3_vl_moe', Qwen3VLMoeForConditionalGeneration)")


def load_hf_checkpoint(path, dtype=jnp.float32, mesh: Mesh | None = None, *, compute_dtype=None,
                       rules: Mapping | None = None, config: Qwen3VLConfig | None = None,
                       remat: str | None = None) -> Qwen3VL:
    """Loads a local Hugging Face Qwen3-VL directory (config.json + safetensors, single or sharded).

    dtype: parameter dtype (checkpoint tensors are cast); mesh/rules: place each parameter directly in its
    NamedSharding (None: the first device); remat: 'none' | 'block' (training). Raises CheckpointError naming a
    missing / wrongly shaped tensor or an unsupported architecture."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found (expected a Hugging Face checkpoint directory)")
    with open(cfg_path, encoding="utf-8") as f:
        config_dict = json.load(f)
    _check_architecture(config_dict, cfg_path)
    cfg = config or Qwen3VLConfig.from_hf(config_dict)
    if remat is not None:
        cfg = cfg.replace(remat=remat)
    reader = CheckpointReader(path)
    check_tensor_names(cfg, reader.where, path)
    return model_from_tensors(cfg, reader.get, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, rules=rules,
                              where=path, drop=reader.drop)


def experts_to_hf(gate: np.ndarray, up: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """One layer's gate and up expert kernels (X, E, I) -> the fused gate_up_proj in the released layout
    (X, E, 2I), or transformers' (X, 2I, E) when the two layouts have the same shape (E == 2I)."""
    fused = np.concatenate([gate, up], axis=2)  # (X, E, 2I)
    if fused.shape == spec.hf_shape:  # ambiguous by shape: write the layout transformers takes as is
        return np.ascontiguousarray(fused.transpose(0, 2, 1))
    return np.ascontiguousarray(fused)


def _expert_down_to_hf(ours: np.ndarray, spec: ParamSpec) -> np.ndarray:
    """ours (X, I, E) -> down_proj in the released layout (X, I, E), or transformers' (X, E, I) when E == I."""
    if ours.shape == spec.hf_shape:
        return ours_to_hf(ours, spec)
    return np.ascontiguousarray(ours)


@jax.jit
def _layer_slice(stacked, i):
    return jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False)


def _host(model: Qwen3VL, spec: ParamSpec, np_dtype, layer: int | None = None) -> np.ndarray:
    """A parameter (or, with `layer`, one slice of a stacked one) gathered to the host as numpy."""
    value = _get_param(model, spec.path)[...]
    if layer is not None:
        value = _layer_slice(value, np.int32(layer))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        value = multihost_utils.process_allgather(value, tiled=True)
    host = np.asarray(jax.device_get(value))
    return host if np_dtype is None else host.astype(np_dtype)


def iter_hf_tensors(model: Qwen3VL, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_key, numpy tensor) one parameter at a time (gathered to the host); the gate and up expert
    kernels of a layer leave as one fused gate_up_proj."""
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    specs = param_specs(model.config)
    by_kind = {s.kind: s for s in specs if s.kind in EXPERT_KINDS}
    for spec in specs:
        if spec.kind == "expert_up":
            continue  # written with its gate half
        if spec.kind in EXPERT_KINDS:  # one layer at a time: a layer's experts are GBs, all layers' tens of GBs
            for i, key in enumerate(spec.keys):
                part = _host(model, spec, np_dtype, layer=i)
                if spec.kind == "expert_gate":
                    yield key, experts_to_hf(part, _host(model, by_kind["expert_up"], np_dtype, layer=i), spec)
                else:
                    yield key, _expert_down_to_hf(part, spec)
            continue
        host = _host(model, spec, np_dtype)
        for i, key in enumerate(spec.keys):
            part = host[i] if spec.stacked else host
            yield key, ours_to_hf(part, spec)


def _write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]]):
    header, offset = {}, 0
    for key, arr in tensors:
        name = _ST_NAMES.get(arr.dtype)
        if name is None:
            raise ValueError(f"cannot write tensor {key} of dtype {arr.dtype} to safetensors")
        header[key] = {"dtype": name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def save_hf_checkpoint(model: Qwen3VL, path, dtype=None, max_shard_bytes: int = 5 << 30):
    """Writes `model` as a Hugging Face checkpoint directory that transformers loads directly.

    dtype: tensor dtype on disk (default: the parameter dtype). Shards above max_shard_bytes go to
    model-0000i-of-0000n.safetensors with model.safetensors.index.json. Only process 0 writes."""
    path = os.fspath(path)
    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(path, exist_ok=True)
    out_dtype = jnp.dtype(dtype or model.param_dtype)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    sizes = [0]
    written: list[str] = []
    for key, arr in iter_hf_tensors(model, out_dtype):
        if sizes[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
            # Flush the full shard now: host memory holds at most one shard.
            if is_writer:
                name = f"model-part-{len(shards):05d}.safetensors"
                _write_safetensors(os.path.join(path, name), shards[-1])
                written.append(name)
            shards[-1] = [(k, None) for k, _ in shards[-1]]
            shards.append([])
            sizes.append(0)
        shards[-1].append((key, arr))
        sizes[-1] += arr.nbytes
    if not is_writer:
        return
    total = sum(sizes)
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
    else:
        name = f"model-part-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, name), shards[-1])
        written.append(name)
        n = len(shards)
        weight_map = {}
        for i, (old, shard) in enumerate(zip(written, shards)):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(path, old), os.path.join(path, final))
            weight_map.update({k: final for k, _ in shard})
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict(dtype=str(out_dtype)), f, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-save a Hugging Face Qwen3-VL checkpoint through the Flax port")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max_shard_gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    model = load_hf_checkpoint(args.src, dtype=jnp.dtype(args.dtype))
    save_hf_checkpoint(model, args.dst, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
