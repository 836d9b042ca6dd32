"""Persistent compilation cache: on by default, and a second start of the same program compiles nothing."""

import json
import os
import subprocess
import sys

from vaopd_jax.runtime import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = r"""
import json, sys
from vaopd_jax.runtime import compile_cache
path = compile_cache.enable(sys.argv[1])
counter = compile_cache.CompileCounter()
import jax, jax.numpy as jnp
x = jnp.arange(16.0).reshape(4, 4)
y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0))(x)
z = jax.jit(lambda a, b: a * b + 1)(y, y)
s = counter.stats()
print(json.dumps({"dir": path, "compiled": s.compiled, "hits": s.cache_hits, "value": float(z.sum())}))
"""


def run(cache_arg):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    proc = subprocess.run([sys.executable, "-c", PROGRAM, cache_arg], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_start_compiles_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    first, second = run(cache), run(cache)
    assert first["dir"] == cache and first["compiled"] >= 2 and first["hits"] == 0
    assert second["compiled"] == 0 and second["hits"] == first["compiled"]
    assert second["value"] == first["value"]
    off = run("none")
    assert off["dir"] is None and off["hits"] == 0 and off["compiled"] == first["compiled"]


def test_default_dir_is_shared_per_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == os.path.join(str(tmp_path), "vaopd_jax", "jax_compilation_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/cache")
    assert compile_cache.default_dir() == "/shared/cache"
