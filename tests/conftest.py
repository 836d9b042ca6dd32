"""Test-wide settings: 8 simulated CPU devices so mesh tests run in one process."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hypothesis_profiles  # noqa: E402

hypothesis_profiles.register()  # HYPOTHESIS_PROFILE=ci (default) | nightly: tests/hypothesis_profiles.py


def pytest_configure(config):
    """One persistent XLA compilation cache for the session, shared by every xdist worker (set before they
    start): the trainer subprocesses of test_train, test_train_faults and test_study compile many of the same
    programs. VAOPD_TEST_JAX_CACHE set by the caller keeps them across sessions instead."""
    del config
    if "PYTEST_XDIST_WORKER" not in os.environ and not os.environ.get("VAOPD_TEST_JAX_CACHE"):
        os.environ["VAOPD_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="vaopd_test_jax_cache_")
        os.environ["_VAOPD_TEST_JAX_CACHE_OWNED"] = "1"


def pytest_unconfigure(config):
    del config
    if "PYTEST_XDIST_WORKER" not in os.environ and os.environ.pop("_VAOPD_TEST_JAX_CACHE_OWNED", None):
        shutil.rmtree(os.environ.pop("VAOPD_TEST_JAX_CACHE"), ignore_errors=True)
