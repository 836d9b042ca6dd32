"""The start-up line naming the backend, and the warning when a GPU/TPU config lands on CPU."""

import jax
import pytest

from vaopd_jax.parallel import backend


def info(platform="cpu", kind="cpu", plugins=(), jax_platforms=""):
    return backend.BackendInfo(platform=platform, device_kind=kind, num_devices=8, num_local_devices=8,
                               process_count=1, jax_version="0.10.2", plugins=plugins, jax_platforms=jax_platforms)


def test_this_process_is_described():
    found = backend.backend_info()
    assert (found.platform, found.num_devices) == (jax.default_backend(), jax.device_count())
    line = backend.describe(found)
    assert line.startswith(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in 1 process(es)")
    assert f"backend {jax.default_backend()}" in line and f"jax {jax.__version__}" in line


@pytest.mark.parametrize("kwargs, expected", [
    (dict(dtype="float32", attention_impl="xla", mesh_shape=(-1, 1, 1)), []),
    (dict(dtype="bfloat16"), ["bfloat16 weights and matmuls"]),
    (dict(attention_impl="chunked"), ["attention_impl='chunked'"]),
    (dict(mesh_shape=(1, -1, 1)), []),  # FSDP over "all devices" fits one CPU device too
    (dict(mesh_shape=(1, 8, 1)), ["a multi-device mesh (1, 8, 1)"]),
    (dict(dtype="bfloat16", attention_impl="chunked", mesh_shape=(1, 4, 2)),
     ["bfloat16 weights and matmuls", "attention_impl='chunked'", "a multi-device mesh (1, 4, 2)"]),
])
def test_which_configs_expect_an_accelerator(kwargs, expected):
    assert backend.accelerator_reasons(**kwargs) == expected


def test_paper_config_on_cpu_warns_with_the_install_command():
    line, warnings = backend.startup_report(info(), dtype="bfloat16", attention_impl="chunked", mesh_shape=(1, -1, 1))
    assert line.startswith("devices: 8 x cpu in 1 process(es) (backend cpu")
    assert len(warnings) == 1
    assert "bfloat16 weights and matmuls; attention_impl='chunked'" in warnings[0]
    assert 'pip install -e ".[cuda]"' in warnings[0] and '".[tpu]"' in warnings[0]


def test_warning_names_the_cause_of_the_cpu_fallback():
    _, forced = backend.startup_report(info(jax_platforms="cpu"), dtype="bfloat16")
    assert "JAX_PLATFORMS='cpu' restricts JAX to the CPU" in forced[0]
    _, broken = backend.startup_report(info(plugins=("jax-cuda12-plugin==0.10.2",)), dtype="bfloat16")
    assert "jax-cuda12-plugin==0.10.2 is installed but found no usable device" in broken[0]


def test_no_warning_for_cpu_configs_or_on_accelerators():
    assert backend.startup_report(info(), dtype="float32", attention_impl="xla", mesh_shape=(-1, 1, 1))[1] == []
    gpu = info("gpu", "NVIDIA H100 80GB HBM3")
    assert backend.startup_report(gpu, dtype="bfloat16", attention_impl="cudnn", mesh_shape=(1, 8, 1))[1] == []
    assert backend.startup_report(info("tpu", "TPU v5p"), dtype="bfloat16", attention_impl="chunked")[1] == []


def test_cudnn_attention_off_an_nvidia_gpu_is_an_error_naming_the_field():
    for where in (info(), info("tpu", "TPU v5p")):
        with pytest.raises(backend.BackendMismatch, match=r"config\.model\.attention_impl = 'cudnn' needs an NVIDIA"):
            backend.startup_report(where, attention_impl="cudnn", field_prefix="config.model.")
