"""OCRBench (echo840/OCRBench, test, 1,000 rows).

Layout: parquet ``data/test-*.parquet`` with ``dataset``, ``question``,
``question_type``, ``answer`` (LIST of acceptable strings) and ``image`` (HF struct).
Official scoring (Yuliang-Liu/MultimodalOCR ``OCRBench/scripts/*.py``): a question is
right when a gold answer is a substring of the response, both stripped with newlines
as spaces: case-insensitive, except for the ``HME100k`` rows (handwritten math
expressions), which are compared case-sensitively with all spaces removed; the score
is the count out of 1,000, reported /10. Scoring.mode 'strict' compares HME100k rows
case-sensitively with their spaces kept.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark, Scoring
from vaopd_jax.eval.benchmarks.common import BadRecord, Record

HME = "Handwritten Mathematical Expression Recognition"


class OCRBench(Benchmark):
    name = "ocrbench"
    display = "OCRBench"
    group = "visual"
    patterns = ("**/test-*.parquet", "**/test.parquet", "**/OCRBench*.parquet")
    required_columns = ("question", "answer", "image")
    protocol = ("rule: a gold answer is a substring of the response (case-insensitive; HME100k case-sensitive); "
                "points out of 1,000, reported /10")
    leniency = "HME100k answers are compared with all spaces removed (official)"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = f"{path.stem}-{index}"
        common.require(row, ("question", "answer"), rid)
        answers = row["answer"]
        if isinstance(answers, str):  # some exports stringify the list
            try:
                parsed = ast.literal_eval(answers)
                answers = parsed if isinstance(parsed, (list, tuple)) else [answers]
            except (ValueError, SyntaxError):
                answers = [answers]
        answers = [str(a) for a in answers if str(a).strip()]
        if not answers:
            raise BadRecord(f"record {rid}: empty answer list")
        image = common.image_ref(row.get("image"), path.parent)
        if image is None:
            raise BadRecord(f"record {rid}: no image")
        qtype = common.clean_str(row.get("question_type"))
        dataset = common.clean_str(row.get("dataset"))
        # The official scripts key the rule on the source dataset; its 100 rows are the HME category.
        hme = dataset == "HME100k" if dataset else qtype == HME
        return Record(id=rid, question=str(row["question"]).strip(), images=(image,), answer=answers,
                      meta={"question_type": qtype, "hme": hme})

    def kind(self, record: Record) -> str:
        return common.KIND_OCR

    def ocr_correct(self, record: Record, text: str, scoring: Scoring) -> bool:
        if record.meta.get("hme"):
            return common.ocr_match(text, self.golds(record), case_sensitive=True,
                                    drop_spaces=scoring.mode == "official")
        return common.ocr_match(text, self.golds(record))

    def aggregate(self, rows, num_samples: int, scoring: Scoring = Scoring()) -> dict:
        points = float(np.mean([sum(bool(r["correct"][k]) for r in rows) for k in range(num_samples)]))
        accuracy = common.run_means(rows, common.sample_accuracy, num_samples)
        return {"score": 100.0 * accuracy, "accuracy": accuracy, "points": points, "questions": len(rows)}
