"""MMStar (Lin-Chen/MMStar, val, 1,500 rows).

Layout: parquet (``mmstar.parquet`` or ``val-*.parquet``) with ``index``,
``question`` (options inline: ``Options: A: ..., B: ..., C: ..., D: ...``),
``answer`` (A-D), ``category``, ``l2_category`` and ``image`` (HF struct).
Scoring: option letter (the official protocol may use a judge as fallback).
The average: VLMEvalKit reports the mean over all 1,500 questions ("Overall");
lmms-eval's "average" is the mean of the per-``l2_category`` means. Both are reported
(``accuracy_rows``, ``accuracy_l2_categories``); ``Scoring.mmstar_average`` picks the score.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.ai2d import MC_SUFFIX
from vaopd_jax.eval.benchmarks.base import Benchmark, Scoring
from vaopd_jax.eval.benchmarks.common import BadRecord, Record

_INLINE_OPTION = re.compile(r"(?:^|[\s,(])([A-F])\s*[:.)]\s*")


def parse_inline_options(question: str) -> Optional[list[str]]:
    """Option texts from 'Options: A: x, B: y' at the end of the question, else None."""
    marker = question.rfind("Options:")
    if marker < 0:
        return None
    text = question[marker + len("Options:") :]
    matches = list(_INLINE_OPTION.finditer(text))
    letters = "".join(m.group(1) for m in matches)
    if len(matches) < 2 or letters != common.LETTERS[: len(matches)]:
        return None
    out = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out.append(text[match.end() : end].strip().rstrip(",").strip())
    return out


class MMStar(Benchmark):
    name = "mmstar"
    display = "MMStar"
    group = "visual"
    patterns = ("**/mmstar.parquet", "**/val-*.parquet", "**/val.parquet")
    required_columns = ("index", "question", "answer", "image")
    official_uses_judge = True
    protocol = "rule: option letter match (official: judge fallback)"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = common.clean_str(row.get("index")) or f"{path.stem}-{index}"
        common.require(row, ("question", "answer"), rid)
        answer = str(row["answer"]).strip().upper()
        if len(answer) != 1 or answer not in "ABCDEF":
            raise BadRecord(f"record {rid}: answer {row['answer']!r} is not an option letter A-F")
        image = common.image_ref(row.get("image"), path.parent)
        if image is None:
            raise BadRecord(f"record {rid}: no image")
        question = str(row["question"]).strip()
        return Record(
            id=rid, question=f"{question}\n{MC_SUFFIX}", images=(image,), answer=answer,
            meta={"options": parse_inline_options(question), "category": common.clean_str(row.get("category")),
                  "l2_category": common.clean_str(row.get("l2_category"))},
        )

    def kind(self, record: Record) -> str:
        return common.KIND_CHOICE

    def aggregate(self, rows, num_samples: int, scoring: Scoring = Scoring()) -> dict:
        out = super().aggregate(rows, num_samples)
        out["categories"] = _group_means(rows, "category", num_samples)
        l2 = _group_means(rows, "l2_category", num_samples)
        out["l2_categories"] = l2
        out["accuracy_rows"] = out["score"]
        out["accuracy_l2_categories"] = float(np.mean(list(l2.values()))) if l2 else None
        out["average"] = scoring.mmstar_average
        if scoring.mmstar_average == "l2_categories":
            out["score"] = out["accuracy_l2_categories"]
        return out


def _group_means(rows, field: str, num_samples: int) -> dict:
    """{value of meta[field]: avg@k accuracy (0-100)} over the rows that carry it."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["meta"].get(field) or "", []).append(row)
    return {name: 100.0 * common.run_means(group, common.sample_accuracy, num_samples)
            for name, group in sorted(groups.items()) if name}
