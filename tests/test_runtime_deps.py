"""The runtime needs nothing beyond what `pip install -e .` installs (tests/runtime_env.py).

Each check runs in a subprocess that sees only setup.py's install_requires and their own
requirements: torch, the test extras and whatever only they bring (jinja2 through torch, for one)
are hidden. Importing every module, every third-party module the package imports anywhere (lazy
imports included), each entry point's --help, and a prompt through the chat template and a graded
answer must work there. The last test hides jinja2 too and checks that the prompt check fails:
the hiding is real.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

from runtime_env import REPO, hiding_env, refused, runtime_env

PACKAGE = os.path.join(REPO, "vaopd_jax")
TEST_ONLY_IMPORTS = {"torch"}  # benchmarks compare against the torch reference when it is installed


def is_test_reference(name: str) -> bool:
    """torch, and transformers' torch models (the parity references of models/qwen3_vl/testing.py)."""
    return name.partition(".")[0] in TEST_ONLY_IMPORTS or (name.startswith("transformers.models.")
                                                           and ".modeling_" in name)


def package_modules() -> list[str]:
    names = []
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
                names.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return sorted(names)


def entry_points() -> list[str]:
    """Modules with a `if __name__ == "__main__":` block (the `python -m ...` commands)."""
    found = []
    for module in package_modules():
        path = os.path.join(REPO, *module.split(".")) + ".py"
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in tree.body:
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and getattr(node.test.left, "id", None) == "__name__"):
                found.append(module)
    return found


def third_party_imports() -> list[str]:
    """Every module named by an import statement anywhere in the package, lazy imports included,
    except the package itself, the standard library and the test-only references."""
    names = set()
    for module in package_modules():
        path = os.path.join(REPO, *module.split("."))
        path = path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    keep = lambda n: n.partition(".")[0] not in sys.stdlib_module_names | {"vaopd_jax", "__future__"} and not is_test_reference(n)
    return sorted(filter(keep, names))


def run_runtime(code_or_args, extra_refused=(), timeout=600):
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    env = runtime_env(extra_refused=extra_refused)
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_the_runtime_environment_hides_torch_and_the_test_extras():
    modules, dists = refused()
    assert "torch" in modules and "torch" in dists
    assert {"pytest", "nbclient"} <= set(dists) or not {"pytest", "nbclient"} & set(dists)
    proc = run_runtime("import importlib.util, importlib.metadata as m, sys\n"
                       "assert importlib.util.find_spec('torch') is None\n"
                       "try:\n    import torch\nexcept ModuleNotFoundError:\n    print('no torch')\n"
                       "try:\n    m.version('torch')\nexcept m.PackageNotFoundError:\n    print('no torch metadata')\n"
                       "import pytest\n")
    assert "no torch\nno torch metadata" in proc.stdout, proc.stderr[-3000:]
    assert "No module named 'pytest'" in proc.stderr


def test_every_module_and_every_import_it_names_work_without_torch():
    modules = package_modules() + third_party_imports()
    assert "vaopd_jax.train" in modules and "math_verify" in modules and "tokenizers" in modules
    code = ("import importlib, traceback\nfailed = []\n"
            f"for name in {modules!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as e:\n        failed.append(f'{name}: {e!r}')\n"
            "print('FAILED', failed)\n")
    proc = run_runtime(code)
    assert proc.returncode == 0 and "FAILED []" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


ENTRY_POINTS = entry_points()


def needs_own_process(module: str) -> bool:
    """absl commands keep their flags in one global registry; the trainer re-executes itself at start-up
    (runtime/host_malloc.py): each of these gets a process of its own."""
    with open(os.path.join(REPO, *module.split(".")) + ".py", encoding="utf-8") as f:
        source = f.read()
    return "app.run(" in source or "reexec_with_hugepages()" in source


def test_entry_points_are_found():
    assert {"vaopd_jax.train", "vaopd_jax.evaluate", "vaopd_jax.models.qwen3_vl.convert",
            "vaopd_jax.eval.benchmarks.fixtures", "vaopd_jax.bench.step"} <= set(ENTRY_POINTS), ENTRY_POINTS
    assert needs_own_process("vaopd_jax.train") and not needs_own_process("vaopd_jax.bench.step")


def assert_help(module: str, returncode: int, output: str) -> None:
    """A usage message and a clean exit (absl's --help and the grading worker's usage line exit 1)."""
    assert "Traceback" not in output, f"{module} --help:\n{output[-4000:]}"
    assert returncode in (0, 1) and ("usage" in output.lower() or "flags:" in output), \
        f"{module} --help exited {returncode}:\n{output[-4000:]}"


@pytest.mark.parametrize("module", [m for m in ENTRY_POINTS if needs_own_process(m)])
def test_own_process_entry_point_help_works_without_torch(module):
    """Each of these commands gets its own process (`needs_own_process`)."""
    proc = run_runtime(["-m", module, "--help"])
    assert_help(module, proc.returncode, proc.stdout + proc.stderr)


HELP_ALL = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for module in MODULES:
    out = io.StringIO()
    sys.argv = [module, "--help"]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # a string code is a message the interpreter would print, exit status 1
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code)
        except BaseException:
            traceback.print_exc()
            code = 99
    results[module] = (code, out.getvalue())
print("RESULTS" + json.dumps(results))
"""


def test_entry_point_help_works_without_torch():
    """The other commands (argparse) share one process: their imports are paid once."""
    modules = [m for m in ENTRY_POINTS if not needs_own_process(m)]
    proc = run_runtime(f"MODULES = {modules!r}\n" + HELP_ALL)
    assert "RESULTS" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    assert sorted(results) == sorted(modules)
    for module, (code, output) in results.items():
        assert_help(module, code, output)


PROMPT_AND_GRADE = """
from vaopd_jax.data import processor, tokenizer
from vaopd_jax.eval import grading
tok = tokenizer.load_tokenizer(None)
ids, mm = processor.build_prompt(tok, "<image>What colour is the disk?", [(1, 4, 4)])
print("prompt tokens", len(ids), "image tokens", int(mm.sum()))
print("graded", grading.grade_responses(["Answer: 12"], ["12"]))
grading.shutdown()
"""


def test_prompt_and_grading_work_without_torch():
    proc = run_runtime(PROMPT_AND_GRADE)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "image tokens 4" in proc.stdout and "graded [True]" in proc.stdout, proc.stdout


def test_a_missing_runtime_dependency_is_caught():
    """Hiding jinja2 (what a fresh virtualenv lacked before setup.py listed it) fails the prompt check."""
    proc = run_runtime(PROMPT_AND_GRADE, extra_refused=("jinja2",))
    assert proc.returncode != 0
    assert "jinja2" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("ci", ["", "1"])
def test_a_missing_torch_skips_locally_and_fails_under_ci(tmp_path, ci):
    """tests/references.py: parity tests never pass by skipping when CI is set."""
    (tmp_path / "test_needs_torch.py").write_text(
        "from references import require\ntorch = require('torch')\n\n\ndef test_parity():\n    pass\n")
    env = hiding_env(["torch"], ["torch"])
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), env["PYTHONPATH"]])
    env.pop("CI", None)
    if ci:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if ci:
        assert proc.returncode != 0 and "torch is required when CI is set" in proc.stdout, proc.stdout[-3000:]
    else:
        assert proc.returncode in (0, 5) and "1 skipped" in proc.stdout, proc.stdout[-3000:]  # 5: nothing else ran
