"""AI2D (lmms-lab/ai2d, test, 3,088 rows).

Layout: parquet ``data/test-*.parquet`` with ``question``, ``options`` (list of
strings), ``answer`` (index of the right option as a string, '0'..'3') and
``image`` (HF struct). Scoring: option letter (or option text) vs the gold letter.
"""

from __future__ import annotations

from pathlib import Path

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark
from vaopd_jax.eval.benchmarks.common import BadRecord, Record

MC_SUFFIX = "Answer with the option's letter from the given choices directly."


class AI2D(Benchmark):
    name = "ai2d"
    display = "AI2D"
    group = "visual"
    patterns = ("**/test-*.parquet", "**/test.parquet")
    required_columns = ("question", "options", "answer", "image")
    protocol = "rule: option letter match"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = f"{path.stem}-{index}"
        common.require(row, ("question", "options", "answer"), rid)
        options = [str(o) for o in row["options"]]
        try:
            answer_index = int(str(row["answer"]).strip())
        except ValueError:
            raise BadRecord(f"record {rid}: answer {row['answer']!r} is not an option index") from None
        if not 0 <= answer_index < len(options):
            raise BadRecord(f"record {rid}: answer index {answer_index} outside its {len(options)} options")
        image = common.image_ref(row.get("image"), path.parent)
        if image is None:
            raise BadRecord(f"record {rid}: no image")
        question = f"{str(row['question']).strip()}\n{common.format_options(options)}\n{MC_SUFFIX}"
        return Record(id=rid, question=question, images=(image,), answer=common.LETTERS[answer_index],
                      meta={"options": options})

    def kind(self, record: Record) -> str:
        return common.KIND_CHOICE
