"""JAX's persistent compilation cache, on by default, and a count of what each run compiles.

    cache_dir = compile_cache.enable(config.compilation_cache_dir)   # before the first jit runs
    counter = compile_cache.CompileCounter()                         # counts from here on
    ...
    print(counter.summary())   # '0 programs compiled, 57 loaded from the persistent cache'

A restarted run (after a preemption, a crash or a config-identical rerun) loads its XLA
executables from the cache instead of compiling them again. The cache key covers the program,
the devices and topology, the compile options and the JAX/XLA versions, so a run on another
mesh or JAX version compiles (and adds) its own entries. Every program is cached, however fast
it compiled (``jax_persistent_cache_min_compile_time_secs`` = 0), so a second start compiles
nothing.

Default directory: ``$JAX_COMPILATION_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/vaopd_jax/jax_compilation_cache`` (``~/.cache/...``): one per machine, shared
by its runs. Only process 0 writes entries (JAX's rule); on a multi-host slice point the cache
at storage every host reads (a ``gs://`` bucket or a shared filesystem) so the other hosts hit
it too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import jax
from jax import monitoring

log = logging.getLogger(__name__)

DISABLED = ("none", "off")
_HITS = "/jax/compilation_cache/cache_hits"
_MISSES = "/jax/compilation_cache/cache_misses"
_COMPILE = "/jax/core/compile/backend_compile_duration"  # once per executable requested (compiled or cache hit)


def default_dir() -> str:
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vaopd_jax", "jax_compilation_cache")


def enable(cache_dir: str = "") -> str | None:
    """Turns the persistent cache on in ``cache_dir`` ('' = ``default_dir()``; 'none' = off).

    Returns the directory used, or None when off. Call it before the first compilation: JAX
    decides once per process whether the cache is used.
    """
    if str(cache_dir).strip().lower() in DISABLED:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = cache_dir or default_dir()
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """Executables requested since the counter started: ``compiled`` by XLA, ``cache_hits`` loaded."""

    requested: int
    cache_hits: int
    cache_misses: int

    @property
    def compiled(self) -> int:
        return self.requested - self.cache_hits


class CompileCounter:
    """Counts executables compiled and loaded from the persistent cache (JAX monitoring events)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {_HITS: 0, _MISSES: 0, _COMPILE: 0}
        monitoring.register_event_listener(self._on_event)
        monitoring.register_event_duration_secs_listener(self._on_duration)
        self._closed = False

    def _on_event(self, event: str, **kwargs) -> None:
        if event in (_HITS, _MISSES):
            with self._lock:
                self._counts[event] += 1

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE:
            with self._lock:
                self._counts[_COMPILE] += 1

    def stats(self) -> CompileStats:
        with self._lock:
            return CompileStats(self._counts[_COMPILE], self._counts[_HITS], self._counts[_MISSES])

    def summary(self) -> str:
        s = self.stats()
        return f"{s.compiled} programs compiled, {s.cache_hits} loaded from the persistent cache"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            monitoring.unregister_event_listener(self._on_event)
            monitoring.unregister_event_duration_listener(self._on_duration)
