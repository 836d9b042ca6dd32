"""Hypothesis profiles of the property tests (tests/test_properties_*.py), loaded by tests/conftest.py.

    pytest tests/test_properties_objective.py                           # "ci": the default, and with CI=1
    HYPOTHESIS_PROFILE=nightly pytest tests/test_properties_*.py        # 20x the examples, random seeds

"ci" tries a fixed number of examples per property with a derandomised seed (the same inputs on every run,
no example database), so the suite's time and outcome do not vary; "nightly" explores new inputs on every
run and keeps the failing ones in .hypothesis/ for the next. A property states its CI example count with
``cases(n)``; the profile scales it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

PROFILES = {
    # derandomize: the seed comes from the test's name, so CI runs the same examples every time.
    # No explain phase: it re-runs a failing property many times to annotate the report (minutes with JAX).
    "ci": dict(derandomize=True, database=None, phases=tuple(p for p in Phase if p != Phase.explain), scale=1),
    "nightly": dict(derandomize=False, scale=20),
}


def profile_name() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r}; known profiles: {sorted(PROFILES)}")
    return name


def register() -> None:
    """Registers both profiles and loads the one named by $HYPOTHESIS_PROFILE (default "ci")."""
    for name, options in PROFILES.items():
        options = {k: v for k, v in options.items() if k != "scale"}
        # No deadline: the first example of a property compiles its JAX programs (seconds on 2 cores).
        settings.register_profile(name, deadline=None, print_blob=True,
                                  suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
                                  **options)
    settings.load_profile(profile_name())


def cases(ci_examples: int) -> settings:
    """``@cases(50)``: 50 examples under "ci", 20x that under "nightly"."""
    return settings(max_examples=ci_examples * PROFILES[profile_name()]["scale"])
