"""Writers of small fixture files in the public dataset formats (docs/data.md).

Used by the tests and the data benchmark (and reusable by other readers' tests): Geometry3K
parquet shards (HF layout), ViRL39K raw (parquet + images folder) and embedded layouts. Images are
synthetic line drawings / noise of configurable size; nothing is downloaded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def line_drawing(width: int, height: int, seed: int = 0) -> Image.Image:
    """A Geometry3K-like figure: white background, a few black segments and labels."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(5)]
    for a, b in zip(points, points[1:] + points[:1]):
        draw.line([a, b], fill=(0, 0, 0), width=2)
    for i, p in enumerate(points):
        draw.text(p, "ABCDE"[i], fill=(0, 0, 0))
    return image


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encoded bytes of `image` (PNG by default, as HF stores Geometry3K)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(path))
    return path


def _image_struct_column(images_per_row: Sequence[Sequence[bytes]]):
    import pyarrow as pa

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.array([[{"bytes": b, "path": None} for b in row] for row in images_per_row], type=pa.list_(struct))


def write_geometry3k(
    root: str | os.PathLike,
    split: str = "train",
    num_rows: int = 8,
    image_size: tuple[int, int] = (320, 240),
    seed: int = 0,
    num_shards: int = 1,
    with_id: bool = False,
    corrupt_rows: Sequence[int] = (),
    empty_question_rows: Sequence[int] = (),
    missing_answer_rows: Sequence[int] = (),
    long_question_rows: Sequence[int] = (),
) -> list[Path]:
    """Writes `root/data/{split}-0000i-of-0000n.parquet` with columns images, problem, answer[, id].

    The *_rows arguments plant bad records: undecodable image bytes, an empty question, a null
    answer, a question of ~20k tokens. Returns the shard paths.
    """
    root = Path(root)
    rows = list(range(num_rows))
    images, problems, answers, ids = [], [], [], []
    for i in rows:
        width = image_size[0] + (i * 37) % 50
        height = image_size[1] + (i * 23) % 40
        data = encode_image(line_drawing(width, height, seed * 100_003 + i))
        images.append([b"\x89PNG\r\n\x1a\n garbage" if i in corrupt_rows else data])
        question = f"<image>Find x. Problem {i}: AB = {i + 2}, BC = {2 * i + 3}."
        if i in empty_question_rows:
            question = ""
        if i in long_question_rows:
            question = "<image>" + "Find the angle. " * 5000
        problems.append(question)
        answers.append(None if i in missing_answer_rows else f"{i + 2} \\sqrt {{ {2 * i + 3} }}")
        ids.append(f"g3k-{split}-{i}")
    paths = []
    per_shard = -(-num_rows // num_shards)
    for s in range(num_shards):
        sl = slice(s * per_shard, (s + 1) * per_shard)
        columns = {
            "images": _image_struct_column(images[sl]),
            "problem": problems[sl],
            "answer": answers[sl],
        }
        if with_id:
            columns["id"] = ids[sl]
        paths.append(_write_parquet(root / "data" / f"{split}-{s:05d}-of-{num_shards:05d}.parquet", columns))
    return paths


def write_virl39k_raw(
    root: str | os.PathLike,
    num_rows: int = 6,
    image_size: tuple[int, int] = (200, 160),
    seed: int = 0,
    multi_image_rows: Sequence[int] = (1,),
    missing_file_rows: Sequence[int] = (),
) -> Path:
    """Writes `root/39Krelease.parquet` + `root/images/<qid>-k.jpg` (raw ViRL39K layout)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    categories = ["(GradeSchool) Geometric", "Tables/Diagrams/Charts", "Spatial Reasoning"]
    questions, answers, image_lists, qids, cats, sources = [], [], [], [], [], []
    for i in range(num_rows):
        qid = f"virl-{seed}-{i}"
        n_images = 2 if i in multi_image_rows else 1
        paths = []
        for k in range(n_images):
            rel = f"images/{qid}-{k}.jpg"
            if i not in missing_file_rows:
                line_drawing(image_size[0] + 10 * k, image_size[1], seed * 1000 + i * 10 + k).save(root / rel, "JPEG")
            paths.append(rel)
        placeholders = "".join("<image>" for _ in range(n_images))
        questions.append(f"{placeholders}How many triangles are in figure {i}?")
        answers.append(f"\\boxed{{{i + 1}}}")
        image_lists.append(paths)
        qids.append(qid)
        cats.append(categories[i % len(categories)])
        sources.append("fixture")
    return _write_parquet(
        root / "39Krelease.parquet",
        {"question": questions, "answer": answers, "image": image_lists, "category": cats, "source": sources,
         "qid": qids, "PassRate_32BTrained": [0.5] * num_rows},
    )


def write_virl39k_embedded(
    root: str | os.PathLike, num_rows: int = 6, image_size: tuple[int, int] = (200, 160), seed: int = 0,
    multi_image_rows: Sequence[int] = (2,),
) -> Path:
    """Writes `root/data/train-00000-of-00001.parquet` in the embedded ViRL39K layout (images, problem, answer)."""
    images, problems, answers = [], [], []
    for i in range(num_rows):
        n_images = 2 if i in multi_image_rows else 1
        images.append([encode_image(line_drawing(image_size[0], image_size[1], seed * 1000 + i * 10 + k))
                       for k in range(n_images)])
        problems.append("".join("<image>" for _ in range(n_images)) + f"What is the value of y in figure {i}?")
        answers.append(f"\\boxed{{{3 * i}}}")
    return _write_parquet(
        Path(root) / "data" / "train-00000-of-00001.parquet",
        {"images": _image_struct_column(images), "problem": problems, "answer": answers},
    )


# ----------------------------------------------------------------------------- records with injected faults
def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb) with almost no data: Pillow sees
    the size when it opens the file, before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def fault_image(kind: str, width: int, height: int, seed: int) -> dict:
    """The HF Image struct {bytes, path} of one image fault (FAULTS' image kinds)."""
    drawing = line_drawing(width, height, seed)
    if kind == "undecodable":
        return {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}
    if kind == "truncated":
        data = encode_image(drawing)
        return {"bytes": data[: len(data) // 2], "path": None}
    if kind == "missing_file":
        return {"bytes": None, "path": f"/nonexistent/vaopd_fixture_{seed}.png"}
    if kind == "bomb":
        return {"bytes": bomb_png(), "path": None}
    if kind == "cmyk":
        return {"bytes": encode_image(drawing.convert("CMYK"), "JPEG"), "path": None}
    if kind == "high_bit_depth":  # a 16-bit greyscale PNG using its full range
        grey = np.asarray(drawing.convert("L"), np.uint16) * 257
        return {"bytes": encode_image(Image.fromarray(grey)), "path": None}
    if kind == "animated":
        buffer = io.BytesIO()
        drawing.save(buffer, format="GIF", save_all=True, append_images=[line_drawing(width, height, seed + 1)])
        return {"bytes": buffer.getvalue(), "path": None}
    raise ValueError(f"unknown image fault {kind!r}")


# Every fault `write_geometry3k_with_faults` can plant -> the pipeline counter it must move (data/pipeline.py):
# skipped records (data/skipped/<reason>) and images kept after a conversion (data/converted/<kind>).
FAULTS = {
    "undecodable": "data/skipped/undecodable_image", "truncated": "data/skipped/undecodable_image",
    "missing_file": "data/skipped/missing_image_file", "bomb": "data/skipped/image_too_large",
    "empty_answer": "data/skipped/empty_answer", "missing_answer": "data/skipped/missing_field",
    "long_prompt": "data/skipped/prompt_too_long", "corrupt_row_group": "data/skipped/unreadable_row",
    "cmyk": "data/converted/cmyk", "high_bit_depth": "data/converted/high_bit_depth",
    "animated": "data/converted/animated",
}
KEPT_FAULTS = ("cmyk", "high_bit_depth", "animated")  # converted and trained on, not skipped


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrites the page headers of one row group's column chunks: reading that row group fails, the others
    (and the footer) stay readable."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(str(path)).metadata.row_group(group)
    with open(path, "r+b") as f:
        for c in range(metadata.num_columns):
            column = metadata.column(c)
            start = column.dictionary_page_offset or column.data_page_offset
            f.seek(start)
            f.write(b"\xff" * min(16, column.total_compressed_size))


def write_geometry3k_with_faults(root: str | os.PathLike, faults: dict, *, num_rows: int,
                                 image_size: tuple[int, int] = (96, 64), row_group_size: int = 2,
                                 clean: bool = False, split: str = "train") -> dict:
    """A Geometry3K train shard with faults planted (``faults``: row index -> a FAULTS kind), or with ``clean``
    only the rows a pipeline keeps (the same rows, ids and bytes, in the same order): the pair a data-fault
    test compares. "corrupt_row_group" marks a whole row group (``row_group_size`` rows) unreadable.

    Returns {"path", "ids" (of the rows written), "kept_ids" (rows the pipeline must keep, in order),
    "counts" ({counter: n} the pipeline must report, FAULTS' counter names)}.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_groups = {row // row_group_size for row, kind in faults.items() if kind == "corrupt_row_group"}
    counts: dict[str, int] = {}
    rows = []
    for i in range(num_rows):
        kind = "corrupt_row_group" if i // row_group_size in bad_groups else faults.get(i)
        width, height = image_size[0] + (i * 7) % 20, image_size[1] + (i * 5) % 16
        image = (fault_image(kind, width, height, seed=i) if kind in ("undecodable", "truncated", "missing_file",
                                                                        "bomb", *KEPT_FAULTS)
                 else {"bytes": encode_image(line_drawing(width, height, seed=i)), "path": None})
        question = f"<image>Find x. Problem {i}: AB = {i + 2}, BC = {2 * i + 3}."
        if kind == "long_prompt":
            question = "<image>" + "Find the angle. " * 400
        answer = {"empty_answer": "  ", "missing_answer": None}.get(kind, f"{i + 2} \\sqrt {{ {2 * i + 3} }}")
        keep = kind is None or kind in KEPT_FAULTS
        if kind is not None:
            counts[FAULTS[kind]] = counts.get(FAULTS[kind], 0) + 1
        if keep or not clean:
            rows.append({"id": f"g3k-{split}-{i}", "images": [image], "problem": question, "answer": answer,
                         "keep": keep})
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"images": pa.array([r["images"] for r in rows], type=pa.list_(struct)),
                      "problem": [r["problem"] for r in rows], "answer": pa.array([r["answer"] for r in rows],
                                                                                  type=pa.string()),
                      "id": [r["id"] for r in rows]})
    path = Path(root) / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    if not clean:
        for group in sorted(bad_groups):
            _corrupt_row_group(path, group)
    return {"path": path, "ids": [r["id"] for r in rows], "kept_ids": [r["id"] for r in rows if r["keep"]],
            "counts": {} if clean else counts}
