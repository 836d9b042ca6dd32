"""Shared pieces of the benchmark readers and scorers.

A benchmark reader turns local files in the benchmark's public Hugging Face layout
into :class:`Record` s; a scorer turns the sampled responses per record into extracted
answers and per-sample correctness; an aggregator turns the per-sample rows of a
whole benchmark into its score (0-100, avg@k: the metric of each of the k sample
"runs", averaged over runs).

Images stay undecoded (:class:`ImageRef`: HF image struct bytes or a file path) until
a prompt is built, so a corrupt image costs one record, not the run: decoding
failures raise :class:`BadRecord` and are counted and reported by the evaluator.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from vaopd_jax.eval import grading

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Kinds of per-sample grading (Benchmark.kind_of(record)).
KIND_CHOICE = "choice"  # option letter vs gold letter
KIND_MATH = "math"  # free-form answer vs gold(s) through grading.grade_batch (math-verify)
KIND_OCR = "ocr"  # a gold answer is a substring of the response (Benchmark.ocr_correct)
KIND_YESNO = "yesno"  # yes/no extraction vs gold yes/no


class MissingBenchmark(FileNotFoundError):
    """The benchmark's files are not on disk (reported as missing, never as a zero score)."""


class BadRecord(ValueError):
    """One record cannot be used (undecodable image, missing image file, missing field)."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An undecoded image: HF image struct bytes, or a path (absolute or relative to base_dir)."""

    data: Optional[bytes] = None
    path: Optional[str] = None
    base_dir: Optional[str] = None

    def describe(self) -> str:
        if self.data is not None:
            return f"<{len(self.data)} embedded bytes{', ' + self.path if self.path else ''}>"
        return str(self.resolved_path())

    def resolved_path(self) -> Optional[Path]:
        if self.path is None:
            return None
        path = Path(self.path)
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path

    def load(self):
        """Decoded RGB-convertible PIL image; raises BadRecord naming the problem."""
        from PIL import Image

        if self.data is not None:
            source = io.BytesIO(self.data)
        else:
            path = self.resolved_path()
            if path is None:
                raise BadRecord("image has neither bytes nor a path")
            if not path.is_file():
                raise BadRecord(f"image file {path} does not exist")
            source = str(path)
        try:
            image = Image.open(source)
            image.load()  # force the full decode here, not later inside preprocessing
        except Exception as err:  # PIL raises several types for truncated/corrupt files
            raise BadRecord(f"image {self.describe()} cannot be decoded: {type(err).__name__}: {err}") from err
        return image


@dataclasses.dataclass
class Record:
    """One benchmark question.

    id: unique within the benchmark (the benchmark's own id where it has one).
    question: the user-turn text; ``<image>`` placeholders mark where images go
      (none: all images at the start of the turn, Qwen's usual layout).
    images: undecoded images in prompt order (may be empty: text-only questions).
    answer: the gold answer (letter, text, or list of texts for OCRBench / MMMU open).
    meta: JSON-serializable fields the scorer and aggregator need (options, question
      type, WeMath group/key, HallusionBench figure/question ids, ...).
    """

    id: str
    question: str
    images: tuple = ()
    answer: Any = None
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReadResult:
    """Records of one benchmark plus what could not be read (counted, never silent)."""

    records: list
    files: list
    problems: list = dataclasses.field(default_factory=list)  # [{"id":..., "reason":...}]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def find_files(root: Path, patterns: Sequence[str], benchmark: str) -> list[Path]:
    """Files under ``root`` matching the FIRST glob pattern that matches anything.

    Raises MissingBenchmark naming the directory and the patterns tried.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingBenchmark(f"{benchmark}: directory {root} does not exist")
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True) if os.path.isfile(p))
        if found:
            return found
    raise MissingBenchmark(f"{benchmark}: no file under {root} matches any of {list(patterns)}")


def read_parquet_rows(path: Path, required: Sequence[str], benchmark: str) -> list[dict]:
    """All rows of a parquet file as dicts; raises ValueError naming missing columns."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as err:
        raise ValueError(f"{benchmark}: cannot read parquet file {path}: {type(err).__name__}: {err}") from err
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{benchmark}: parquet file {path} lacks columns {missing}; it has {table.column_names}"
        )
    return table.to_pylist()


def image_ref(value: Any, base_dir: Path) -> Optional[ImageRef]:
    """ImageRef from an HF image struct {bytes, path}, a path string, or raw bytes; None if null."""
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            return None
        return ImageRef(data=data, path=path or None, base_dir=str(base_dir))
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value), base_dir=str(base_dir))
    if isinstance(value, str) and value:
        return ImageRef(path=value, base_dir=str(base_dir))
    raise BadRecord(f"unsupported image value of type {type(value).__name__}")


def clean_str(value: Any) -> str:
    """str(value) with None/NaN as ''."""
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    return str(value)


def require(row: dict, fields: Iterable[str], row_id: str) -> None:
    """Raise BadRecord if a required field is missing or empty."""
    for field in fields:
        if row.get(field) is None or (isinstance(row.get(field), str) and not row[field].strip()):
            raise BadRecord(f"record {row_id}: field {field!r} is missing or empty")


# --------------------------------------------------------------------------------------
# Prompt helpers
# --------------------------------------------------------------------------------------


def format_options(options: Sequence[str]) -> str:
    """'A. first\\nB. second' (the VLMEvalKit / lmms-eval option block)."""
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


# --------------------------------------------------------------------------------------
# Per-sample extraction
# --------------------------------------------------------------------------------------


_ANSWER_IS = re.compile(
    r"(?i)\b(?:answer|option|choice)\s+(?:is|would\s+be|should\s+be)\s*:?\s*(?:option\s*)?[(\[]?([A-Z])\b[)\]]?"
)
SHORT_REPLY_CHARS = 80


def extract_choice_from_response(text: str, options: Optional[Sequence[str]] = None) -> Optional[str]:
    """Option letter of a response: from its committed answer, else from the reply itself.

    1. The committed answer (first ``\\boxed{}`` / ``Answer:`` line, grading.extract_answer)
       read as a letter or option text.
    2. A short one-line reply (multiple-choice prompts ask for the letter directly):
       ``B``, ``B. 45°``, ``(B)``, ``Option B``, or the text of one option.
    3. In a longer reply, the first "answer/option/choice is X" phrase (not a mere
       mention such as "option A is wrong": "is" must follow answer/option/choice).
    """
    committed = grading.extract_answer(text)
    if committed is not None:
        letter = grading.extract_choice(committed, options)
        if letter is not None:
            return letter
    stripped = (text or "").strip()
    if not stripped:
        return None
    if "\n" not in stripped and len(stripped) <= SHORT_REPLY_CHARS:
        letter = grading.extract_choice(stripped, options)
        if letter is not None:
            return letter
    valid = LETTERS[: len(options)] if options else LETTERS
    for match in _ANSWER_IS.finditer(stripped):
        if match.group(1) in valid:
            return match.group(1)
    return None


_YES = {"yes", "true", "correct"}
_NO = {"no", "not", "false", "incorrect"}


def extract_yes_no(text: str) -> Optional[str]:
    """'yes' / 'no' / None (VLMEvalKit's YOrN rule on the committed answer, else the reply).

    A reply counts as yes (no) when its words contain yes (no) and not the other.
    """
    committed = grading.extract_answer(text)
    for candidate in ([committed] if committed else []) + [text or ""]:
        words = set(re.findall(r"[a-z]+", candidate.lower()))
        has_yes, has_no = "yes" in words, "no" in words
        if has_yes and not has_no:
            return "yes"
        if has_no and not has_yes:
            return "no"
    return None


def ocr_match(text: str, golds: Sequence[str], *, case_sensitive: bool = False, drop_spaces: bool = False) -> bool:
    """OCRBench rule (the official eval script): a gold answer is a substring of the response.

    Both sides are stripped and newlines become spaces. Default (every category but
    HME100k): case-insensitive. HME100k (handwritten math) officially: case-sensitive with
    the spaces removed (``case_sensitive=True, drop_spaces=True``).
    """
    def clean(value: str) -> str:
        value = str(value).strip().replace("\n", " ")
        if not case_sensitive:
            value = value.lower()
        return value.replace(" ", "") if drop_spaces else value

    pred = clean(text or "")
    return any(clean(gold) and clean(gold) in pred for gold in golds)


def run_means(rows: Sequence[dict], metric, num_samples: int) -> float:
    """avg@k: ``metric(rows, k)`` for each sample index k, averaged over k."""
    values = [metric(rows, k) for k in range(num_samples)]
    return float(np.mean(values)) if values else float("nan")


def sample_accuracy(rows: Sequence[dict], k: int) -> float:
    """Fraction of rows whose k-th sample is correct."""
    if not rows:
        return float("nan")
    return float(np.mean([bool(r["correct"][k]) for r in rows]))
