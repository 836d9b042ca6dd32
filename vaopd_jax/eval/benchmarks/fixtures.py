"""Tiny fixture copies of the eight benchmarks in their public Hugging Face layouts.

Used by the tests and for a smoke run of the evaluator without the real data::

    python -m vaopd_jax.eval.benchmarks.fixtures /tmp/fake_benchmarks
    python -m vaopd_jax.evaluate --config configs/eval_default.py:tiny \\
        --config.benchmarks_dir=/tmp/fake_benchmarks

Each writer creates the directory ``<root>/<benchmark>`` with parquet files whose
column names, types and nesting follow the public release (HF image structs
``{bytes, path}``, MMMU's ``image_1..image_7`` and stringified options, OCRBench's
answer lists, HallusionBench's two splits, MathVista's raw ``image`` paths), and
returns the rows it wrote.
"""

from __future__ import annotations

import io
from pathlib import Path

CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n this is not an image"


def png_bytes(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A small deterministic RGB PNG (width, height) with a coloured block."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", (width, height), ((seed * 53) % 256, (seed * 97) % 256, (seed * 29) % 256))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(255 - (seed * 53) % 256, 20, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_struct(seed: int, name: str | None = None, data: bytes | None = None) -> dict:
    """HF ``Image()`` feature encoding: {bytes, path}."""
    return {"bytes": png_bytes(seed) if data is None else data, "path": name or f"{seed}.png"}


def _write(path: Path, rows: list[dict], schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))


def _image_type():
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_wemath(root: Path) -> list[dict]:
    """A 2-step group (3 rows) and a 3-step group (4 rows) that share the ID '7', as the release's can."""
    rows = []
    for group, steps in (("7", 2), ("7", 3)):
        keys = [f"{steps}steps_{i}" for i in range(1, steps + 1)] + [f"{steps}steps_multi"]
        for number, key in enumerate(keys, start=1):
            rows.append({
                "ID": group, "split": "testmini", "knowledge concept": "Angles", "key": key,
                "question": f"[{key}] What is the angle?", "option": "A. 30°; B. 45°; C. 60°; D. 90°",
                "answer": "B", "question number": number, "knowledge concept description": "angles",
                "image_path": image_struct(len(rows) + 1),
            })
    _write(Path(root) / "wemath" / "testmini.parquet", rows)
    return rows


def write_mathvista(root: Path, *, missing_file: bool = True) -> list[dict]:
    """Multiple choice, integer and float free-form rows (+ a row whose image file is missing)."""
    import pyarrow as pa

    base = Path(root) / "mathvista"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "images" / "3.png").write_bytes(png_bytes(3))
    rows = [
        {"pid": "1", "question": "Which angle is marked?", "image": "images/1.png",
         "decoded_image": image_struct(1, "images/1.png"), "choices": ["30°", "45°", "60°"], "unit": None,
         "precision": None, "answer": "45°", "question_type": "multi_choice", "answer_type": "text",
         "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                  "at the end.\nQuestion: Which angle is marked?\nChoices:\n(A) 30°\n(B) 45°\n(C) 60°"},
        {"pid": "2", "question": "How many blocks?", "image": "images/2.png",
         "decoded_image": image_struct(2, "images/2.png"), "choices": None, "unit": None, "precision": None,
         "answer": "3", "question_type": "free_form", "answer_type": "integer",
         "query": "Hint: Please answer the question requiring an integer answer.\nQuestion: How many blocks?"},
        {"pid": "3", "question": "What is the ratio?", "image": "images/3.png",  # raw layout: path only
         "decoded_image": None, "choices": None, "unit": None, "precision": 2.0, "answer": "1.25",
         "question_type": "free_form", "answer_type": "float",
         "query": "Hint: Please answer the question requiring a floating-point number with two decimal "
                  "places.\nQuestion: What is the ratio?"},
    ]
    if missing_file:
        rows.append({"pid": "4", "question": "Missing image?", "image": "images/404.png", "decoded_image": None,
                     "choices": None, "unit": None, "precision": None, "answer": "7",
                     "question_type": "free_form", "answer_type": "integer", "query": "Question: Missing image?"})
    schema = pa.schema([
        ("pid", pa.string()), ("question", pa.string()), ("image", pa.string()), ("decoded_image", _image_type()),
        ("choices", pa.list_(pa.string())), ("unit", pa.string()), ("precision", pa.float64()),
        ("answer", pa.string()), ("question_type", pa.string()), ("answer_type", pa.string()),
        ("query", pa.string()),
    ])
    _write(base / "data" / "testmini-00000-of-00001.parquet", rows, schema)
    return rows


def write_mathverse(root: Path) -> list[dict]:
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "Find x. Choices: A:1 B:2 C:3 D:4", "image": image_struct(11), "answer": "B",
         "question_type": "multi-choice", "query_wo": "Find x.", "question_for_eval": "Find x.",
         "query_cot": "Please first conduct reasoning, and then answer the question and provide the correct "
                      "option letter, e.g., A, B, C, D, at the end.\nQuestion: Find x. Choices: A:1 B:2 C:3 D:4"},
        # Vision Only: the question is in the image; the text fields hold only the instruction.
        {"sample_index": "2", "problem_index": "2", "problem_version": "Vision Only",
         "question": "", "image": image_struct(12), "answer": "2\\sqrt{221}",
         "question_type": "free-form",
         "query_wo": "According to the question shown in the image, please directly answer the question.",
         "question_for_eval": "Find the length.",
         "query_cot": "According to the question shown in the image, please first conduct reasoning, and then "
                      "answer the question."},
    ]
    _write(Path(root) / "mathverse" / "testmini.parquet", rows)
    return rows


def write_hallusionbench(root: Path) -> list[dict]:
    """The release's row kinds: VD set 0 (original figure 0 with visual_input 1, edited figure 1 with
    visual_input 2) x two questions, VS set 1 (figures 1 and 2, visual_input 1 / 2) x one question in the
    image split, and that VS question without a figure (figure_id 0, visual_input 0) in the non-image split."""
    import pyarrow as pa

    base = Path(root) / "hallusionbench" / "data"

    def row(category, subcategory, set_id, figure, visual_input, question, text, gt):
        has_image = visual_input != "0"
        return {
            "category": category, "subcategory": subcategory, "visual_input": visual_input, "set_id": set_id,
            "figure_id": figure, "sample_note": "", "question_id": question, "question": text,
            "gt_answer_details": "", "gt_answer": gt,
            "filename": f"{category}/{subcategory}/{set_id}_{figure}.png" if has_image else None,
            "image": image_struct(20 + 3 * int(set_id) + int(figure)) if has_image else None,
        }

    image_rows = [
        row("VD", "illusion", "0", figure, "1" if figure == "0" else "2", question,
            f"Is line {question} longer in figure {figure}?", "1" if question == figure else "0")
        for figure in ("0", "1") for question in ("0", "1")
    ] + [
        row("VS", "chart", "1", "1", "1", "0", "According to the chart, was A larger than B in 2020?", "1"),
        row("VS", "chart", "1", "2", "2", "0", "According to the chart, was A larger than B in 2020?", "0"),
    ]
    non_image_rows = [row("VS", "chart", "1", "0", "0", "0", "Was A larger than B in 2020?", "1")]
    schema = pa.schema([(k, pa.string()) for k in image_rows[0] if k != "image"] + [("image", _image_type())])
    _write(base / "image-00000-of-00001.parquet", image_rows, schema)
    _write(base / "non_image-00000-of-00001.parquet", non_image_rows, schema)
    return image_rows + non_image_rows


def write_ai2d(root: Path) -> list[dict]:
    rows = [
        {"question": "Which stage comes first?", "options": ["egg", "larva", "pupa", "adult"], "answer": "0",
         "image": image_struct(31)},
        {"question": "What eats grass?", "options": ["hawk", "rabbit", "sun"], "answer": "1",
         "image": image_struct(32)},
    ]
    _write(Path(root) / "ai2d" / "data" / "test-00000-of-00001.parquet", rows)
    return rows


def write_mmmu(root: Path) -> list[dict]:
    """A single-image MC row, a three-image MC row (images referenced out of order and in
    the options), and an open numeric row, in two subject folders."""
    import pyarrow as pa

    def row(rid, question, options, answer, qtype, images):
        out = {"id": rid, "question": question, "options": options, "explanation": "", "img_type": "['Diagrams']",
               "answer": answer, "topic_difficulty": "Easy", "question_type": qtype, "subfield": "x"}
        for n in range(1, 8):
            out[f"image_{n}"] = image_struct(40 + n + len(rid), f"{rid}_{n}.png") if n in images else None
        return out

    art = [
        row("validation_Art_1", "<image 1> Which style is this painting?", "['Cubism', 'Baroque', 'Pop art']",
            "A", "multiple-choice", {1}),
        row("validation_Art_2", "Compare <image 2> with <image 1>. Which option matches both?",
            "['<image 3>', 'neither', 'both']", "C", "multiple-choice", {1, 2, 3}),
    ]
    math = [row("validation_Math_1", "<image 1> What is the area of the square?", "[]", "16", "open", {1})]
    schema = pa.schema(
        [(k, pa.string()) for k in ("id", "question", "options", "explanation")]
        + [(f"image_{n}", _image_type()) for n in range(1, 8)]
        + [(k, pa.string()) for k in ("img_type", "answer", "topic_difficulty", "question_type", "subfield")]
    )
    _write(Path(root) / "mmmu" / "Art" / "validation-00000-of-00001.parquet", art, schema)
    _write(Path(root) / "mmmu" / "Math" / "validation-00000-of-00001.parquet", math, schema)
    return art + math


def write_mmstar(root: Path, *, corrupt: bool = True) -> list[dict]:
    rows = [
        {"index": 0, "question": "What colour is the block?\nOptions: A: red, B: blue, C: green, D: purple",
         "image": image_struct(51), "answer": "D", "category": "coarse perception", "l2_category": "color"},
        {"index": 1, "question": "How many blocks?\nOptions: A: 1, B: 2, C: 3, D: 4",
         "image": image_struct(52), "answer": "A", "category": "fine-grained perception", "l2_category": "count"},
    ]
    if corrupt:
        rows.append({"index": 2, "question": "Corrupt image?\nOptions: A: yes, B: no",
                     "image": image_struct(53, data=CORRUPT_BYTES), "answer": "A", "category": "coarse perception",
                     "l2_category": "x"})
    _write(Path(root) / "mmstar" / "mmstar.parquet", rows)
    return rows


def write_ocrbench(root: Path) -> list[dict]:
    rows = [
        {"dataset": "IIIT5K", "question": "what is written in the image?", "question_type": "Regular Text Recognition",
         "answer": ["STOP"], "image": image_struct(61)},
        {"dataset": "HME100k", "question": "Please write out the expression of the formula in the image using LaTeX format.",
         "question_type": "Handwritten Mathematical Expression Recognition", "answer": ["x ^ { 2 } + 1"],
         "image": image_struct(62)},
        {"dataset": "docVQA", "question": "What is the date?", "question_type": "Doc-oriented VQA",
         "answer": ["May 5", "5 May"], "image": image_struct(63)},
    ]
    _write(Path(root) / "ocrbench" / "data" / "test-00000-of-00001.parquet", rows)
    return rows


WRITERS = {
    "wemath": write_wemath, "mathvista": write_mathvista, "mathverse": write_mathverse,
    "hallusionbench": write_hallusionbench, "ai2d": write_ai2d, "mmmu": write_mmmu, "mmstar": write_mmstar,
    "ocrbench": write_ocrbench,
}


def write_all(root, names=None) -> dict:
    """Write the fixtures of ``names`` (default all eight) under ``root``; returns {name: rows}."""
    return {name: WRITERS[name](Path(root)) for name in (names or WRITERS)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Writes tiny copies of the eight benchmarks (public layouts).")
    parser.add_argument("output_dir", help="folder to create; one sub-folder per benchmark")
    output_dir = parser.parse_args().output_dir
    for name, rows in write_all(output_dir).items():
        print(f"{name}: {len(rows)} rows -> {Path(output_dir) / name}")
