"""Hides the packages a fresh `pip install -e .` would not have (see tests/runtime_env.py).

On PYTHONPATH with ``VAOPD_REFUSE_MODULES`` / ``VAOPD_REFUSE_DISTS`` (JSON lists) set, every finder on
``sys.meta_path`` is wrapped so that a refused top-level module is not found (``import torch`` raises
ModuleNotFoundError, ``importlib.util.find_spec("torch")`` returns None) and a refused distribution has no
metadata, exactly as if it were not installed. Child Python processes inherit it through PYTHONPATH.
"""

import json
import os
import re
import sys


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _Hiding:
    """A meta-path finder that answers for `finder` except for refused modules and distributions."""

    def __init__(self, finder, modules: frozenset, dists: frozenset):
        self._finder, self._modules, self._dists = finder, modules, dists

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self._modules:
            return None
        find_spec = getattr(self._finder, "find_spec", None)
        return None if find_spec is None else find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self._finder, "find_distributions", None)
        for dist in (() if find is None else find(*args, **kwargs)):
            name = dist.metadata["Name"] if dist.metadata else None
            if name is None or _normalize(name) not in self._dists:
                yield dist

    def invalidate_caches(self):
        invalidate = getattr(self._finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()

    def __getattr__(self, name):
        return getattr(self._finder, name)


def _install() -> None:
    modules = frozenset(json.loads(os.environ.get("VAOPD_REFUSE_MODULES") or "[]"))
    dists = frozenset(_normalize(d) for d in json.loads(os.environ.get("VAOPD_REFUSE_DISTS") or "[]"))
    if not (modules or dists):
        return
    for name in [m for m in sys.modules if m.partition(".")[0] in modules]:
        del sys.modules[name]
    sys.meta_path[:] = [_Hiding(finder, modules, dists) for finder in sys.meta_path]


_install()
