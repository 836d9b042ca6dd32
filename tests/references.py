"""Test-time references (torch, transformers' torch models, the notebook runner).

On a developer's machine without them, the tests that need them are skipped. Under CI (the `CI`
environment variable set, as `.ci/run` does) a missing reference fails the run instead: the parity
tests must never pass by skipping there.
"""

import importlib
import os

import pytest

INSTALL = "pip install torch==2.13.0 && pip install -e '.[test]'"


def require(name: str):
    """The imported module `name`; a skip when it is missing, a failure when it is missing under CI."""
    if not os.environ.get("CI"):
        return pytest.importorskip(name, reason=f"{name} is not installed ({INSTALL})")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"{name} is required when CI is set (tests against the reference must run, not skip): "
                    f"{e!r}. Install the test extras: {INSTALL}", pytrace=False)
