"""MathVerse (AI4Math/MathVerse, testmini, 3,940 rows = 788 problems x 5 versions).

Layout: parquet ``testmini.parquet`` with ``sample_index``, ``problem_index``,
``problem_version``, ``question``, ``query_cot`` / ``query_wo`` (official prompts),
``answer``, ``question_type`` (``multi-choice`` | ``free-form``),
``question_for_eval`` and ``image`` (HF struct; may be null).

The 788 Vision-Only rows carry their question inside the image: their ``question``
may be empty and the text is in ``query_cot`` / ``query_wo``; a row needs an answer,
a question type and one of ``query_cot``, ``query_wo``, ``question``.

Scoring (paper: rule-based): multiple choice by option letter, free form through
math-verify on the first committed answer. VLMEvalKit uses a judge instead.
"""

from __future__ import annotations

from pathlib import Path

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark, Scoring
from vaopd_jax.eval.benchmarks.common import BadRecord, Record


class MathVerse(Benchmark):
    name = "mathverse"
    display = "MathVerse"
    group = "math"
    patterns = ("**/testmini.parquet", "**/testmini-*.parquet")
    required_columns = ("sample_index", "question", "answer", "question_type")
    official_uses_judge = True
    protocol = "rule: option letter / math-verify on the first committed answer (VLMEvalKit: judge)"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = common.clean_str(row.get("sample_index")) or f"{path.stem}-{index}"
        common.require(row, ("answer", "question_type"), rid)
        texts = [common.clean_str(row.get(field)).strip() for field in ("query_cot", "query_wo", "question")]
        if not any(texts):
            raise BadRecord(f"record {rid}: query_cot, query_wo and question are all missing or empty")
        qtype = str(row["question_type"])
        answer = str(row["answer"]).strip()
        if qtype == "multi-choice":
            letter = answer.strip("() .").upper()
            if len(letter) != 1 or letter not in common.LETTERS:
                raise BadRecord(f"record {rid}: multi-choice answer {answer!r} is not an option letter")
            answer = letter
        image = common.image_ref(row.get("image"), path.parent)
        question = next(text for text in texts if text)  # the official CoT prompt where there is one
        return Record(
            id=rid, question=question, images=(image,) if image is not None else (), answer=answer,
            meta={"question_type": qtype, "problem_version": common.clean_str(row.get("problem_version"))},
        )

    def kind(self, record: Record) -> str:
        return common.KIND_CHOICE if record.meta["question_type"] == "multi-choice" else common.KIND_MATH

    def aggregate(self, rows, num_samples: int, scoring: Scoring = Scoring()) -> dict:
        """avg@k accuracy over all versions (the paper's number) plus per-version accuracy."""
        out = super().aggregate(rows, num_samples)
        groups: dict = {}
        for row in rows:
            groups.setdefault(row["meta"].get("problem_version") or "", []).append(row)
        out["versions"] = {name: 100.0 * common.run_means(group, common.sample_accuracy, num_samples)
                           for name, group in sorted(groups.items()) if name}
        return out
