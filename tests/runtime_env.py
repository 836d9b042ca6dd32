"""The Python environment a user gets from `pip install -e .` alone, simulated inside the test environment.

The test environment holds more than the runtime needs (torch, pytest, jupyter ...), and those
packages drag in others (torch brings jinja2, networkx ...). A runtime import of a package that
only such a test dependency brings works here and fails for the user. ``runtime_env()`` returns
environment variables for a subprocess that sees only setup.py's ``install_requires`` and their
own requirements, recursively: every other installed package is hidden by
``tests/runtime_only/sitecustomize.py`` (not found, no metadata). torch is always hidden.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re

from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK_DIR = os.path.join(REPO, "tests", "runtime_only")
ALWAYS_PRESENT = {"pip"}  # every fresh virtualenv has pip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_requires(setup_py: str = os.path.join(REPO, "setup.py")) -> list[str]:
    """The literal ``install_requires`` list of setup.py's ``setup(...)`` call."""
    with open(setup_py, encoding="utf-8") as f:
        tree = ast.parse(f.read(), setup_py)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "install_requires":
                    return list(ast.literal_eval(keyword.value))
    raise AssertionError(f"{setup_py}: no literal install_requires in setup(...)")


def runtime_distributions(requirements: list[str]) -> set[str]:
    """Normalized names of the installed distributions `pip install` of `requirements` would bring:
    the requirements and, recursively, their own (markers evaluated, extras followed)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = normalize(req.name)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing of it can be imported either
        extras = sorted(req.extras)
        if name in seen and not extras:
            continue
        seen.add(name)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ["", *extras]):
                todo.append(sub)
    return seen


@functools.lru_cache(maxsize=None)
def refused(extra_refused: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(top-level module names, distribution names) installed here but outside the runtime set.

    A top-level name shared by several distributions stays importable if any of them is in the set.
    ``extra_refused`` hides more distributions (to check that a test notices a missing one).
    """
    allowed = runtime_distributions(install_requires()) | {normalize("vaopd_jax")} | ALWAYS_PRESENT
    allowed -= {normalize(d) for d in extra_refused}
    allowed.discard("torch")
    installed = {normalize(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}
    dists = sorted(installed - allowed)
    modules = sorted(module for module, owners in importlib.metadata.packages_distributions().items()
                     if not any(normalize(o) in allowed for o in owners))
    return sorted(set(modules) | {"torch"}), sorted(set(dists) | {"torch"})


def hiding_env(modules, dists, base: dict | None = None) -> dict:
    """Environment variables for a subprocess in which `modules` / `dists` are not installed."""
    env = dict(os.environ if base is None else base)
    path = [HOOK_DIR, REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update({"PYTHONPATH": os.pathsep.join(path), "VAOPD_REFUSE_MODULES": json.dumps(sorted(modules)),
                "VAOPD_REFUSE_DISTS": json.dumps(sorted(dists))})
    return env


def runtime_env(base: dict | None = None, extra_refused: tuple[str, ...] = ()) -> dict:
    """Environment variables for a subprocess that sees only the runtime's packages (and this checkout)."""
    return hiding_env(*refused(tuple(extra_refused)), base=base)
