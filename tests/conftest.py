"""Test-wide settings: 8 simulated CPU devices so mesh tests run in one process."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hypothesis_profiles  # noqa: E402

hypothesis_profiles.register()  # HYPOTHESIS_PROFILE=ci (default) | nightly: tests/hypothesis_profiles.py
