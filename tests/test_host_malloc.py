"""vaopd_jax.runtime.host_malloc: the trainer re-executes itself once with glibc's huge-page malloc tunable."""

import os
import subprocess
import sys

import pytest

from vaopd_jax.runtime import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
applies = host_malloc.hugepage_env({}) is not None  # Linux, glibc >= 2.35, THP not 'never'


def test_the_users_tunable_wins_and_others_are_kept():
    assert host_malloc.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    if applies:
        env = host_malloc.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0", "X": "1"})
        assert env == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.hugetlb=1", "X": "1"}
        assert host_malloc.hugepage_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.skipif(not applies, reason="needs Linux, glibc >= 2.35 and transparent huge pages not 'never'")
def test_reexec_keeps_the_command_line_and_happens_once(tmp_path):
    script = tmp_path / "main.py"
    script.write_text("import os, sys\n"
                      "from vaopd_jax.runtime import host_malloc\n"
                      "print('start', flush=True)\n"
                      "assert host_malloc.reexec_with_hugepages() is False\n"  # returns only when nothing is to do
                      "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), "--a=1", "b c"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    # The first process printed 'start' and was replaced; the second printed 'start' again and went on.
    assert proc.stdout.splitlines() == ["start", "start", "glibc.malloc.hugetlb=1 ['--a=1', 'b c']"]
