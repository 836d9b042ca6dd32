"""MathVista (AI4Math/MathVista, testmini, 1,000 rows).

Layout: parquet ``data/testmini-*.parquet`` with ``pid``, ``question``, ``query``
(the official prompt: hint, question, choices), ``choices`` (list or null),
``answer`` (the choice TEXT for multiple choice), ``question_type``
(``multi_choice`` | ``free_form``), ``answer_type`` (``integer`` | ``float`` |
``text`` | ``list``), ``precision``, ``unit``, and the image as ``decoded_image``
(HF struct) or ``image`` (relative path, e.g. ``images/1.jpg``).

Official scoring (lupantech/MathVista ``evaluation/calculate_score.py``): an LLM judge
extracts the answer, then it is normalized by answer type (integer: ``int(float(x))``;
float: rounded to ``precision``) and compared exactly; multiple choice compares the
chosen option text, and an extraction that is not an option letter is mapped to the
most similar option by Levenshtein distance (``get_most_similar``: the first of the
closest), so every multiple-choice answer picks an option. Here the rule extraction
(first committed answer / option letter or text) replaces the judge unless one is
configured; the nearest-option rule is applied to the committed answer (else the whole
reply) of a response nothing else parsed (Scoring.mode 'official').
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from vaopd_jax.eval import grading
from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark
from vaopd_jax.eval.benchmarks.common import BadRecord, Record

_NUMBER_WITH_UNIT = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))([a-z]*)")


def parse_number(text: str) -> Optional[float]:
    """A number from an answer like '12', '1,000', '3.5 cm', '25%' (normalized); else None."""
    match = _NUMBER_WITH_UNIT.fullmatch(grading.normalize_answer(text))
    return float(match.group(1)) if match else None


class MathVista(Benchmark):
    name = "mathvista"
    display = "MathVista"
    group = "math"
    patterns = ("**/testmini-*.parquet", "**/testmini.parquet")
    required_columns = ("pid", "question", "answer", "question_type", "answer_type")
    official_uses_judge = True
    protocol = "judge extraction then normalized match (rule-based extraction without a judge)"
    leniency = "an unparsed multiple-choice answer is mapped to the most similar option (Levenshtein, official)"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = common.clean_str(row.get("pid")) or f"{path.stem}-{index}"
        common.require(row, ("question", "answer", "question_type"), rid)
        image = common.image_ref(row.get("decoded_image"), path.parent)
        if image is None and row.get("image"):
            # Raw layout: 'image' is a path relative to the dataset root (parent of data/).
            image = common.ImageRef(path=str(row["image"]), base_dir=str(_dataset_root(path, row["image"])))
        if image is None:
            raise BadRecord(f"record {rid}: no image (neither decoded_image nor image)")
        qtype = str(row["question_type"])
        choices = [str(c) for c in (row.get("choices") or [])]
        meta = {"question_type": qtype, "answer_type": common.clean_str(row.get("answer_type")),
                "precision": row.get("precision")}
        answer = str(row["answer"]).strip()
        if qtype == "multi_choice":
            if answer not in choices:
                raise BadRecord(f"record {rid}: answer {answer!r} is not one of its choices {choices}")
            meta["options"] = choices
            meta["answer_text"] = answer
            answer = common.LETTERS[choices.index(answer)]
        question = common.clean_str(row.get("query")).strip() or str(row["question"]).strip()
        if not row.get("query") and choices:
            question += "\nChoices:\n" + "\n".join(f"({common.LETTERS[i]}) {c}" for i, c in enumerate(choices))
        return Record(id=rid, question=question, images=(image,), answer=answer, meta=meta)

    def kind(self, record: Record) -> str:
        return common.KIND_CHOICE if record.meta["question_type"] == "multi_choice" else common.KIND_MATH

    def fallback_choice(self, record: Record, text: str, sample_index: int) -> Optional[tuple[str, str]]:
        return common.LETTERS[nearest_option(_extraction(text), record.meta["options"])], "nearest_option"

    def grade_free_form(self, record: Record, pred: str) -> Optional[bool]:
        answer_type = record.meta.get("answer_type")
        if answer_type not in ("integer", "float"):
            return None
        value, gold = parse_number(pred), parse_number(str(record.answer))
        if value is None or gold is None:
            return None  # e.g. a LaTeX fraction: math-verify decides
        if answer_type == "integer":
            return int(value) == int(gold)  # official: str(int(float(extraction)))
        precision = record.meta.get("precision")
        digits = int(precision) if precision is not None and precision == precision else 2
        return round(value, digits) == round(gold, digits)


def _extraction(text: str) -> str:
    """What the official judge would hand over, as near as rules get: the committed answer, else the reply."""
    committed = grading.extract_answer(text)
    return (committed if committed is not None else (text or "")).strip()


def nearest_option(extraction: str, options: list) -> int:
    """Index of the option with the smallest Levenshtein distance to extraction (first one on ties)."""
    try:
        from Levenshtein import distance
    except ImportError as err:
        raise ImportError("MathVista's official nearest-option rule needs the Levenshtein package "
                          "(pip install levenshtein), as the official scorer does") from err
    distances = [distance(extraction, str(option)) for option in options]
    return distances.index(min(distances))


def _dataset_root(parquet_path: Path, relative: str) -> Path:
    """Directory against which a relative image path resolves (the parquet's dir or a parent)."""
    for candidate in (parquet_path.parent, *parquet_path.parents):
        if (candidate / relative).exists():
            return candidate
    return parquet_path.parent
