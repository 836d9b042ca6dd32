"""Sharding: logical axis rules; on an 8-device (data=2, fsdp=2, tensor=2) CPU mesh the logits still equal
transformers' (hence the single-device port's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vaopd_jax.models import qwen3_vl
from vaopd_jax.models.qwen3_vl import sharding, testing
from vaopd_jax.parallel import make_mesh
from references import require

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: see tests/conftest.py")


def test_make_mesh_shapes_and_errors():
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert dict(make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert dict(make_mesh(data=1, expert=-1, tensor=2).shape) == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2}
    with pytest.raises(ValueError, match=r"needs 12 devices, but 8 are available"):
        make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match=r"only one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)


def test_every_param_has_logical_axes_and_rules_map_them():
    model = qwen3_vl.Qwen3VL(testing.tiny_config(), rngs=nnx.Rngs(0))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    specs = sharding.param_partition_specs(model, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    assert len(flat) > 40
    for path, var in flat.items():
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var[...].ndim, path
    layers = specs["language_model"]["layers"]
    assert layers["q_kernel"] == P(None, "fsdp", "tensor", None)
    assert layers["down_kernel"] == P(None, "tensor", "fsdp")
    assert specs["language_model"]["embed_tokens"] == P("tensor", "fsdp")
    # A dimension the mesh axes do not divide stays replicated instead of failing.
    assert sharding.logical_to_spec(("kv_heads",), mesh=make_mesh(data=2, fsdp=1, tensor=4), shape=(2,)) == P(None)
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("not_an_axis",))


def test_logits_on_2x2x2_mesh_equal_transformers():
    require("torch")
    cfg = testing.tiny_config()
    hf = testing.hf_reference_model(cfg, seed=5)
    single = testing.model_from_hf(hf, cfg)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = testing.model_from_hf(hf, cfg, mesh=mesh)  # the loader's streamed, per-shard placement
    q = sharded.language_model.layers.q_kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len({s.device for s in q.addressable_shards}) == 8
    assert q.addressable_shards[0].data.shape == (cfg.text.num_hidden_layers, 32, 2, 16)

    batch = testing.make_batch(cfg, [[(1, 4, 6)], [], [(1, 8, 4)], [(1, 4, 4)]], [3, 5, 2, 4], seed=6, pad_to=40)
    pos, _ = qwen3_vl.get_rope_index(batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg)
    vi = qwen3_vl.prepare_vision_inputs(batch.image_grid_thw, cfg)
    args = (batch.input_ids, batch.attention_mask, batch.pixel_values)
    # Reference: transformers (the single-device port equals it to 1e-4, test_model_parity), cheaper to run here
    # than compiling the single-device program again.
    ref = testing.hf_logits(hf, batch)

    ids, mask = (jax.device_put(a, sharding.batch_sharding(mesh, 2)) for a in args[:2])
    pos_sharded = jax.device_put(pos, sharding.batch_sharding(mesh, 3, batch_axis=1))
    with jax.set_mesh(mesh):
        out = sharded(ids, mask, jnp.asarray(batch.pixel_values), position_ids=pos_sharded, vision_inputs=vi)
    assert out.sharding.spec[0] == ("data", "fsdp")
    valid = batch.attention_mask.astype(bool)
    assert np.abs(np.asarray(out) - ref)[valid].max() <= 1e-4

    # shard_model moves an existing single-device model onto the mesh in place.
    sharding.shard_model(single, mesh)
    assert single.language_model.layers.q_kernel[...].sharding.spec == P(None, "fsdp", "tensor", None)


def test_maybe_initialize_distributed_is_a_no_op_for_a_single_process(monkeypatch):
    from vaopd_jax.parallel import maybe_initialize_distributed

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert maybe_initialize_distributed() is False
    assert jax.process_count() == 1
