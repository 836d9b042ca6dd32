"""Random-access record sources over the public dataset files (docs/data.md).

A source maps an index to a raw record dict
  {"id": str, "images": [image entry, ...], "question": str, "answer": str, "kind": str, ...}
where an image entry is whatever the file holds: encoded bytes, a file path, or a PIL image.
Entries are decoded by `load_image` inside the pipeline's map, so a corrupt image or a missing
file becomes a counted, logged skip there instead of an exception inside grain's source read.
`__getitem__` never raises for bad row content (missing values come back as None).

A parquet row group that cannot be read (corrupt pages) does not fail the run either: each of its rows
comes back as a record with an ``unreadable`` field naming the file, the row group and the error, which
the pipeline counts and skips like any other bad record.

Construction fails fast, naming the file and the columns, when a file does not exist or a parquet
lacks the expected columns. Sources are picklable (grain worker processes): only paths and row
offsets are pickled; each process opens the parquet files lazily.
"""

from __future__ import annotations

import bisect
import glob
import io
import os
import random
import re
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

GEOMETRY3K_COLUMNS = ("images", "problem", "answer")
VIRL39K_RAW_COLUMNS = ("question", "answer", "image", "qid")
VIRL39K_EMBEDDED_COLUMNS = ("images", "problem", "answer")
GEOMETRY3K_VALIDATION_SIZE = 300


def geometry3k_validation_indices(num_validation: int = GEOMETRY3K_VALIDATION_SIZE, k: int = 200, seed: int = 42) -> list[int]:
    """The paper's validation subset: sorted(random.Random(42).sample(range(300), 200))."""
    return sorted(random.Random(seed).sample(range(num_validation), k))


class ImageTooLargeError(ValueError):
    """An image with more pixels than PIL.Image.MAX_IMAGE_PIXELS (Pillow's decompression-bomb limit)."""


def _opened(image: Image.Image, where: str) -> Image.Image:
    """Refuses an opened (not yet decoded) image past Pillow's pixel limit, then decodes it; animations keep their
    first frame, with the frame count in ``info["n_frames"]`` (processor.image_notes)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise ImageTooLargeError(f"{where}: {image.width} x {image.height} = {image.width * image.height:,} pixels, "
                                 f"more than PIL.Image.MAX_IMAGE_PIXELS = {limit:,} (a decompression bomb?)")
    frames = int(getattr(image, "n_frames", 1) or 1)
    image.load()  # decode now: truncated/corrupt data must fail here, not later
    image.info["n_frames"] = frames
    return image


def load_image(entry: Any, root: str | os.PathLike | None = None) -> Image.Image:
    """Decodes one image entry to a fully loaded PIL image.

    Args:
      entry: PIL image; bytes; an HF Image struct {"bytes": ..., "path": ...}; or a path string
        (relative paths are resolved against `root`).
    Raises:
      FileNotFoundError: the path does not exist.
      ImageTooLargeError: more pixels than PIL.Image.MAX_IMAGE_PIXELS (checked before decoding).
      ValueError: the entry is empty or of an unknown type; PIL errors for undecodable bytes.
    """
    if isinstance(entry, Image.Image):
        return entry
    if isinstance(entry, dict):
        if entry.get("bytes"):
            entry = entry["bytes"]
        elif entry.get("path"):
            entry = entry["path"]
        else:
            raise ValueError("image struct has neither bytes nor path")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        try:
            return _opened(Image.open(io.BytesIO(bytes(entry))), "image bytes")
        except Image.DecompressionBombError as err:  # past twice the limit Pillow refuses at open
            raise ImageTooLargeError(f"image bytes: {err}") from err
    if isinstance(entry, (str, os.PathLike)):
        path = Path(entry)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as image:
                _opened(image, str(path))
                copy = image.copy()  # detached from the closed file
                copy.info["n_frames"] = image.info["n_frames"]
                return copy
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"{path}: {err}") from err
    raise ValueError(f"unsupported image entry of type {type(entry).__name__}")


def strip_boxed(answer: str | None) -> str | None:
    """`\\boxed{x}` -> `x` (ViRL39K wraps answers); other strings unchanged."""
    if answer is None:
        return None
    text = answer.strip()
    match = re.fullmatch(r"\\boxed\s*\{(.*)\}", text, flags=re.DOTALL)
    if not match:
        return answer
    inner = match.group(1)
    depth = 0  # only strip when the braces of the box enclose the whole remainder
    for ch in inner:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return answer
    return inner.strip() if depth == 0 else answer


def resolve_parquet_files(path: str | os.PathLike | Sequence[str | os.PathLike], split: str | None = None) -> list[str]:
    """Parquet files from a file, a glob, a list, or a dataset dir (HF layout: data/{split}-*.parquet).

    Raises:
      FileNotFoundError: nothing matches, naming what was looked for.
    """
    if isinstance(path, (list, tuple)):
        files = [str(p) for p in path]
    else:
        path = str(path)
        if os.path.isdir(path):
            pattern = os.path.join(path, "data", f"{split}-*.parquet") if split else os.path.join(path, "*.parquet")
            files = sorted(glob.glob(pattern))
            if not files and split:
                files = sorted(glob.glob(os.path.join(path, f"{split}-*.parquet")))
            if not files:
                raise FileNotFoundError(f"no parquet files matching {pattern!r} (split={split!r}) under {path!r}")
        elif any(c in path for c in "*?["):
            files = sorted(glob.glob(path))
            if not files:
                raise FileNotFoundError(f"no parquet files match {path!r}")
        else:
            files = [path]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"parquet file {f!r} does not exist")
    return files


def check_columns(files: Sequence[str], required: Sequence[str]) -> list[str]:
    """Column names of the first file after checking every file has `required` (else ValueError naming them)."""
    import pyarrow.parquet as pq

    names: list[str] = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"parquet file {f!r} lacks columns {missing}; expected {list(required)}, found {names}")
    return names


UNREADABLE = "unreadable"  # the field of a record whose parquet row group could not be read


class ParquetRows:
    """Lazy random access to rows (as dicts) of several parquet files; picklable by path.

    Files are read one row group at a time (and kept): a row group that fails to read (corrupt pages) gives,
    for each of its rows, ``{UNREADABLE: "<file> row group <g>: <error>"}`` instead of raising, so one bad
    row group costs its own rows, not the file's.
    """

    def __init__(self, files: Sequence[str], columns: Sequence[str]):
        import pyarrow.parquet as pq

        self.files = list(files)
        self.columns = list(columns)
        self.offsets = [0]
        self.group_offsets = []  # per file: the first local row of each row group, then the file's row count
        for f in self.files:
            metadata = pq.ParquetFile(f).metadata
            starts = [0]
            for g in range(metadata.num_row_groups):
                starts.append(starts[-1] + metadata.row_group(g).num_rows)
            self.group_offsets.append(starts)
            self.offsets.append(self.offsets[-1] + starts[-1])
        self._tables: dict[tuple[int, int], Any] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tables"] = {}  # each process re-reads the files it touches
        return state

    def row(self, index: int) -> dict:
        import pyarrow.parquet as pq

        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        file_index = bisect.bisect_right(self.offsets, index) - 1
        local = index - self.offsets[file_index]
        starts = self.group_offsets[file_index]
        group = bisect.bisect_right(starts, local) - 1
        table = self._tables.get((file_index, group))
        if table is None:
            try:
                table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=self.columns)
            except Exception as err:  # noqa: BLE001 - pyarrow raises OSError / ArrowException subclasses
                table = f"{self.files[file_index]} row group {group}: {type(err).__name__}: {err}"
            self._tables[(file_index, group)] = table
        if isinstance(table, str):
            return {UNREADABLE: table}
        return {name: table.column(name)[local - starts[group]].as_py() for name in self.columns}


class Geometry3KSource:
    """Geometry3K (hiyouga/geometry3k) parquet shards: `images`, `problem` (with <image>), `answer`.

    Args:
      path: dataset dir (data/{split}-*.parquet), a parquet file, a glob or a list of files.
      split: train | validation | test (used to find files in a dir and in default ids).
      indices: optional subset of row indices (e.g. `geometry3k_validation_indices()`).
    """

    def __init__(self, path, split: str = "train", indices: Sequence[int] | None = None):
        self.split = split
        files = resolve_parquet_files(path, split)
        names = check_columns(files, GEOMETRY3K_COLUMNS)
        columns = list(GEOMETRY3K_COLUMNS) + [c for c in ("id",) if c in names]
        self.rows = ParquetRows(files, columns)
        self.indices = None if indices is None else [int(i) for i in indices]
        if self.indices is not None:
            bad = [i for i in self.indices if not 0 <= i < len(self.rows)]
            if bad:
                raise ValueError(f"Geometry3K {split}: indices {bad[:5]} outside [0, {len(self.rows)}) of {files}")

    def __len__(self) -> int:
        return len(self.rows) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row_index = int(index) if self.indices is None else self.indices[int(index)]
        row = self.rows.row(row_index)
        row_id = row.get("id")
        record = {
            "id": str(row_id) if row_id is not None else f"geometry3k-{self.split}-{row_index}",
            "images": list(row.get("images") or []),
            "question": row.get("problem"),
            "answer": row.get("answer"),
            "kind": "geometry",
        }
        if UNREADABLE in row:
            record[UNREADABLE] = row[UNREADABLE]
        return record

    def __repr__(self) -> str:
        n = "all" if self.indices is None else len(self.indices)
        return f"Geometry3KSource(files={self.rows.files}, split={self.split!r}, rows={n})"


def geometry3k_validation_source(path) -> Geometry3KSource:
    """The 200-problem Geometry3K validation subset used for checkpoint selection (docs/method.md)."""
    source = Geometry3KSource(path, split="validation")
    if len(source.rows) != GEOMETRY3K_VALIDATION_SIZE:
        raise ValueError(
            f"Geometry3K validation has {len(source.rows)} rows in {source.rows.files}; the paper's subset rule "
            f"needs the full {GEOMETRY3K_VALIDATION_SIZE}"
        )
    source.indices = geometry3k_validation_indices()
    return source


class ViRL39KSource:
    """ViRL39K in either layout, detected from the parquet columns.

    `path`: a parquet file, a glob, a list, or a folder (39Krelease.parquet inside, else
    data/train-*.parquet, else *.parquet).

    raw (TIGER-Lab/ViRL39K): `39Krelease.parquet` with `question`, `answer` (\\boxed{}), `image`
      (list of paths relative to `images_root`, default the parquet's folder), `qid`, `category`.
    embedded (PAPOGalaxy/PAPO_ViRL39K_train): `images` (list of {bytes, path}), `problem`, `answer`.
    Rows may carry several images; answers are returned without the outer \\boxed{}.
    """

    def __init__(self, path, images_root: str | os.PathLike | None = None):
        import pyarrow.parquet as pq

        if os.path.isdir(str(path)) and os.path.isfile(os.path.join(str(path), "39Krelease.parquet")):
            files = [os.path.join(str(path), "39Krelease.parquet")]  # raw release folder
        elif os.path.isdir(str(path)) and glob.glob(os.path.join(str(path), "data", "train-*.parquet")):
            files = resolve_parquet_files(path, split="train")  # HF dataset folder (embedded layout)
        else:
            files = resolve_parquet_files(path)

        names = pq.read_schema(files[0]).names
        if all(c in names for c in VIRL39K_RAW_COLUMNS):
            self.layout = "raw"
            required = VIRL39K_RAW_COLUMNS
        elif all(c in names for c in VIRL39K_EMBEDDED_COLUMNS):
            self.layout = "embedded"
            required = VIRL39K_EMBEDDED_COLUMNS
        else:
            raise ValueError(
                f"parquet file {files[0]!r} matches no ViRL39K layout: raw needs columns {list(VIRL39K_RAW_COLUMNS)}, "
                f"embedded needs {list(VIRL39K_EMBEDDED_COLUMNS)}; found {names}"
            )
        check_columns(files, required)
        optional = [c for c in ("category", "source", "qid", "id") if c in names and c not in required]
        self.rows = ParquetRows(files, list(required) + optional)
        self.images_root = str(images_root) if images_root is not None else str(Path(files[0]).parent)
        if self.layout == "raw" and not os.path.isdir(self.images_root):
            raise FileNotFoundError(f"ViRL39K raw layout: images root {self.images_root!r} is not a directory")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.row(int(index))
        if UNREADABLE in row:
            return {"id": f"virl39k-{index}", "images": [], "question": None, "answer": None, "kind": "virl39k",
                    UNREADABLE: row[UNREADABLE]}
        if self.layout == "raw":
            paths = row.get("image") or []
            if isinstance(paths, str):
                paths = [paths]
            images = [os.path.join(self.images_root, p) if p else p for p in paths]
            question, row_id = row.get("question"), row.get("qid")
        else:
            images, question = list(row.get("images") or []), row.get("problem")
            row_id = row.get("qid", row.get("id"))
        return {
            "id": str(row_id) if row_id is not None else f"virl39k-{index}",
            "images": images,
            "question": question,
            "answer": strip_boxed(row.get("answer")),
            "kind": row.get("category") or "virl39k",
        }

    def __repr__(self) -> str:
        return f"ViRL39KSource(files={self.rows.files}, layout={self.layout!r}, rows={len(self)})"
