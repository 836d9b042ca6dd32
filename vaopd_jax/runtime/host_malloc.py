"""Transparent huge pages for the host's malloc: one re-exec of the command at start-up (Linux, glibc).

    if __name__ == "__main__":
        host_malloc.reexec_with_hugepages()     # first thing, before JAX is imported

XLA's CPU runtime mallocs each execution's temporaries and frees them when it returns. Blocks
this large are mmapped and unmapped by glibc every time, so every step faults its temporaries
in again, 4 KiB page by 4 KiB page (the kernel zeroes each one). glibc >= 2.35's tunable
``glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages (``madvise(MADV_HUGEPAGE)``,
honoured when THP is in 'madvise' or 'always' mode): 2 MiB per fault. docs/performance.md has
the measured page faults and times.

glibc reads its tunables once, when the process starts, so ``reexec_with_hugepages`` replaces
the process with the same command (``sys.orig_argv``) and ``GLIBC_TUNABLES`` extended with
``glibc.malloc.hugetlb=1``. It does nothing (returns False) when the platform is not Linux with
glibc >= 2.35, when THP is off ('never'), or when ``GLIBC_TUNABLES`` already sets
``glibc.malloc.hugetlb``: the user's choice wins, and ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``
turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_supports_hugetlb() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _thp_enabled() -> bool:
    try:
        with open(_THP_MODE, encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepage_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing is to be done (see the module docstring)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE + "=" in tunables:
        return None
    if not sys.platform.startswith("linux") or not _glibc_supports_hugetlb() or not _thp_enabled():
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def reexec_with_hugepages() -> bool:
    """Replaces this process with the same command and ``glibc.malloc.hugetlb=1`` (when it applies).

    Call it first in a command's ``__main__`` (before JAX or threads start). Returns False when
    there is nothing to do; otherwise it does not return.
    """
    env = hugepage_env(dict(os.environ))
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    return False  # not reached
