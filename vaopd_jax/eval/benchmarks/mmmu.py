"""MMMU (MMMU/MMMU, validation, 900 rows over 30 subject folders).

Layout: ``<Subject>/validation-*.parquet`` with ``id`` (``validation_Art_1``),
``question`` (referring to images as ``<image 1>`` ...), ``options`` (a STRINGIFIED
Python list, ``"['A text', 'B text']"``), ``answer`` (letter for multiple choice;
text, or a stringified list of texts, for open questions), ``question_type``
(``multiple-choice`` | ``open``) and ``image_1`` .. ``image_7`` (HF structs or null).

Images go at the start of the user turn in order of their first ``<image n>``
reference in the question and options (then any unreferenced non-null images);
the ``<image n>`` text stays, so the model can tell them apart.
Scoring: multiple choice by option letter or option text; open answers against
every gold through the normalized match / math-verify (official: rule parse with a
judge fallback). Official leniency (MMMU-Benchmark/MMMU ``eval/eval_utils.py``,
``parse_multi_choice_response``): when no option can be parsed, a random option
(``random.choice``, the module seeded with 42) is the prediction. Here the draw is
seeded per (question id, sample index), so a resumed or multi-process run draws the
same option (Scoring.mode 'official').
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path
from typing import Optional

from vaopd_jax.eval import grading
from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.ai2d import MC_SUFFIX
from vaopd_jax.eval.benchmarks.base import Benchmark
from vaopd_jax.eval.benchmarks.common import BadRecord, Record

OPEN_SUFFIX = "Answer the question using a single word or phrase."
MAX_IMAGES = 7
_IMAGE_REF = re.compile(r"<image (\d+)>")


def parse_list(text, rid: str, field: str) -> list[str]:
    """A stringified Python list ('[...]') -> list of str; raises BadRecord."""
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError) as err:
        raise BadRecord(f"record {rid}: field {field!r} is not a Python list literal: {str(text)[:80]!r}") from err
    if not isinstance(value, (list, tuple)):
        raise BadRecord(f"record {rid}: field {field!r} is not a list: {str(text)[:80]!r}")
    return [str(v) for v in value]


def image_order(texts: list[str], available: list[int]) -> list[int]:
    """Image numbers in order of first reference in texts, then unreferenced ones."""
    order: list[int] = []
    for text in texts:
        for match in _IMAGE_REF.finditer(text):
            number = int(match.group(1))
            if number in available and number not in order:
                order.append(number)
    return order + [n for n in available if n not in order]


class MMMU(Benchmark):
    name = "mmmu"
    display = "MMMU"
    group = "visual"
    patterns = ("**/validation-*.parquet", "**/validation.parquet")
    required_columns = ("id", "question", "options", "answer", "question_type")
    official_uses_judge = True
    protocol = "rule: option letter / normalized open answer (official: rule parse, judge fallback)"
    leniency = "a multiple-choice answer nothing parses gets a random option (seeded per question and sample, official)"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = common.clean_str(row.get("id")) or f"{path.parent.name}-{path.stem}-{index}"
        common.require(row, ("question", "answer", "question_type"), rid)
        qtype = str(row["question_type"])
        options = parse_list(row.get("options") or "[]", rid, "options")
        question = str(row["question"]).strip()
        referenced = []
        for number in range(1, MAX_IMAGES + 1):
            if row.get(f"image_{number}") is not None:
                referenced.append(number)
        for match in _IMAGE_REF.finditer(question + " ".join(options)):
            if int(match.group(1)) not in referenced:
                raise BadRecord(f"record {rid}: refers to <image {match.group(1)}> but image_{match.group(1)} is null")
        images = tuple(
            common.image_ref(row[f"image_{n}"], path.parent) for n in image_order([question, *options], referenced)
        )
        if qtype == "multiple-choice" and options:
            answer = str(row["answer"]).strip().upper()
            if len(answer) != 1 or answer not in common.LETTERS[: len(options)]:
                raise BadRecord(f"record {rid}: answer {row['answer']!r} is not a letter of its {len(options)} options")
            text = f"{question}\n{common.format_options(options)}\n{MC_SUFFIX}"
            meta = {"question_type": qtype, "options": options}
        else:
            raw = str(row["answer"]).strip()
            answer = parse_list(raw, rid, "answer") if raw.startswith("[") else [raw]
            text = f"{question}\n{OPEN_SUFFIX}"
            meta = {"question_type": "open"}
        meta["subject"] = path.parent.name
        return Record(id=rid, question=text, images=images, answer=answer, meta=meta)

    def kind(self, record: Record) -> str:
        return common.KIND_CHOICE if record.meta["question_type"] == "multiple-choice" else common.KIND_MATH

    def fallback_choice(self, record: Record, text: str, sample_index: int) -> Optional[tuple[str, str]]:
        letters = common.LETTERS[: len(record.meta["options"])]
        return random.Random(f"mmmu/{record.id}/{sample_index}").choice(letters), "random_option"

    def extract_free_form(self, record: Record, text: str) -> Optional[str]:
        committed = grading.extract_answer(text)
        if committed is not None:
            return committed
        lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
        # The open prompt asks for a single word or phrase: a one-line reply is the answer.
        return lines[0].rstrip(".") if len(lines) == 1 else None

    def grade_free_form(self, record: Record, pred: str) -> Optional[bool]:
        if any(grading.normalized_match(pred, gold) for gold in self.golds(record)):
            return True
        return None
