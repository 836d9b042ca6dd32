"""HallusionBench (lmms-lab/HallusionBench: image split 951 + non_image split 178).

Layout: parquet ``data/image-*.parquet`` and ``data/non_image-*.parquet`` with
``category`` (VD / VS), ``subcategory``, ``visual_input`` ('0' no image), ``set_id``,
``figure_id``, ``question_id``, ``question``, ``gt_answer`` ('1' yes / '0' no),
``filename`` and ``image`` (HF struct, null for non-image questions).

Metric (official): aAcc = question accuracy; fAcc = share of figures
(category, subcategory, set_id, figure_id) whose questions are ALL right; qAcc =
share of questions (category, subcategory, set_id, question_id) right on ALL their
figures. Reported score = (aAcc + fAcc + qAcc) / 3.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark
from vaopd_jax.eval.benchmarks.common import BadRecord, Record


def _all_right_share(rows: Sequence[dict], k: int, key: str) -> float:
    groups: dict = defaultdict(list)
    for row in rows:
        groups[row["meta"][key]].append(bool(row["correct"][k]))
    return float(np.mean([all(v) for v in groups.values()])) if groups else float("nan")


def hallusion_metrics(rows: Sequence[dict], k: int) -> dict:
    """aAcc, fAcc, qAcc (fractions) of sample run k."""
    return {
        "aAcc": common.sample_accuracy(rows, k),
        "fAcc": _all_right_share(rows, k, "figure_group"),
        "qAcc": _all_right_share(rows, k, "question_group"),
    }


class HallusionBench(Benchmark):
    name = "hallusionbench"
    display = "HallusionBench"
    group = "visual"
    patterns = ("**/image-*.parquet", "**/non_image-*.parquet")
    required_columns = ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer")
    official_uses_judge = False
    protocol = "rule yes/no extraction; (aAcc + fAcc + qAcc) / 3 (official: judge or rule)"

    def locate(self, root: Path) -> list[Path]:
        files: list[Path] = []
        for pattern in self.patterns:  # both splits, not the first that matches
            try:
                files += common.find_files(Path(root), (pattern,), self.name)
            except common.MissingBenchmark:
                pass
        if not files:
            raise common.MissingBenchmark(f"{self.name}: no file under {root} matches any of {list(self.patterns)}")
        return files

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        fields = [common.clean_str(row.get(f)) for f in ("category", "subcategory", "set_id", "figure_id", "question_id")]
        rid = "_".join(fields)
        common.require(row, ("question", "gt_answer"), rid)
        gold = str(row["gt_answer"]).strip().lower()
        gold = {"1": "yes", "0": "no", "yes": "yes", "no": "no"}.get(gold)
        if gold is None:
            raise BadRecord(f"record {rid}: gt_answer {row['gt_answer']!r} is not 1/0/yes/no")
        image = None
        if common.clean_str(row.get("visual_input")) != "0":
            image = common.image_ref(row.get("image"), path.parent)
            if image is None:
                raise BadRecord(f"record {rid}: visual_input={row.get('visual_input')!r} but no image")
        category, subcategory, set_id, figure_id, question_id = fields
        return Record(
            id=rid, question=str(row["question"]).strip(), images=(image,) if image else (), answer=gold,
            meta={
                "figure_group": f"{category}_{subcategory}_{set_id}_{figure_id}",
                "question_group": f"{category}_{subcategory}_{set_id}_{question_id}",
            },
        )

    def kind(self, record: Record) -> str:
        return common.KIND_YESNO

    def aggregate(self, rows: Sequence[dict], num_samples: int) -> dict:
        runs = [hallusion_metrics(rows, k) for k in range(num_samples)]
        means = {name: float(np.mean([r[name] for r in runs])) for name in ("aAcc", "fAcc", "qAcc")}
        return {
            "score": 100.0 * float(np.mean(list(means.values()))),
            **{name: 100.0 * value for name, value in means.items()},
        }
