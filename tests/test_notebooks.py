"""Executes notebooks/quickstart.ipynb and notebooks/real_checkpoints.ipynb headlessly in their tiny mode.

Each notebook runs top to bottom in a fresh python3 kernel (nbclient) inside a temp directory; a cell
that raises fails the test with the cell's traceback. Beyond "no error", each test checks what the
notebook must show: pictures, the token-level VA view (HTML), the comparison table, saved files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from references import require

nbformat = require("nbformat")
nbclient = require("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 900
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _execute(name: str, workdir: Path, monkeypatch, env: dict[str, str]):
    """Runs notebooks/<name> in `workdir` with `env` added to the kernel's environment; returns the notebook."""
    # The kernel (and the trainer it starts) inherits this process's environment: one CPU device like a
    # laptop instead of conftest's 8 simulated ones, and XLA's cheapest CPU compilation (the tiny runs
    # are all compilation), then the notebooks' tiny mode.
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)
    monkeypatch.setenv("VAOPD_NOTEBOOK_TINY", "1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name}: a cell failed:\n{error}")
    return notebook


def _outputs(notebook, mime: str) -> list[str]:
    """Every output of type `mime` (e.g. 'image/png', 'text/html') across the code cells, in order."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if mime in data:
                found.append(data[mime])
    return found


def _stdout(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream")


def test_notebooks_quickstart_tiny(tmp_path, monkeypatch):
    workdir = tmp_path / "runs"
    notebook = _execute("quickstart.ipynb", tmp_path, monkeypatch, {"VAOPD_NOTEBOOK_WORKDIR": str(workdir)})

    # Both methods trained through the real trainer and exported a Hugging Face student.
    for run in ("opd", "va_opd"):
        assert (workdir / run / "export" / "final" / "config.json").is_file(), run
        assert (workdir / run / "metrics.jsonl").is_file(), run
    assert (workdir / "teacher_sft" / "config.json").is_file()
    text = _stdout(notebook)
    assert "teacher: reusing the SFT teacher" in text  # the second run reused the first run's teacher

    # 3 image/pixelated pairs + curves + concentration plot.
    assert len(_outputs(notebook, "image/png")) >= 3 + 2
    markdown = "\n".join(_outputs(notebook, "text/markdown"))
    assert "| student at start | 0 |" in markdown
    assert "| OPD | 2 |" in markdown and "| VA-OPD | 2 |" in markdown
    html = _outputs(notebook, "text/html")
    assert sum('class="va-tokens"' in item for item in html) == 6  # one token view per held-out question


def _write_tiny_checkpoint(path: Path, seed: int) -> None:
    from flax import nnx

    from vaopd_jax import config as config_lib
    from vaopd_jax.models import qwen3_vl

    spec = config_lib.tiny_spec(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vision_depth=1,
                                vision_hidden=32, head_dim=16)
    model = qwen3_vl.Qwen3VL(config_lib.model_config_from_spec(spec), rngs=nnx.Rngs(seed))
    qwen3_vl.save_hf_checkpoint(model, path)


def test_notebooks_real_checkpoints_tiny(tmp_path, monkeypatch):
    from vaopd_jax.data import synthetic

    student_dir, teacher_dir, output_dir = tmp_path / "student", tmp_path / "teacher", tmp_path / "va_view"
    _write_tiny_checkpoint(student_dir, seed=0)
    _write_tiny_checkpoint(teacher_dir, seed=1)
    images = []
    for index in range(2):
        path = tmp_path / f"scene_{index}.png"
        synthetic.render_scene(synthetic.sample_scene(np.random.default_rng(index), size=64)).save(path)
        images.append(str(path))

    notebook = _execute("real_checkpoints.ipynb", tmp_path, monkeypatch, {
        "VAOPD_STUDENT_DIR": str(student_dir), "VAOPD_TEACHER_DIR": str(teacher_dir),
        "VAOPD_IMAGES": os.pathsep.join(images), "VAOPD_OUTPUT_DIR": str(output_dir)})

    num_answers = 2 * 2  # images x NUM_SAMPLES in tiny mode
    html = _outputs(notebook, "text/html")
    assert sum('class="va-tokens"' in item for item in html) == num_answers
    assert sorted(p.name for p in output_dir.glob("*.png")) == [f"va_tokens_{i}.png" for i in range(num_answers)]
    assert len(_outputs(notebook, "image/png")) >= 2  # the two image/pixelated pairs (+ the concentration plot)
    assert f"{num_answers} answers" in _stdout(notebook)
