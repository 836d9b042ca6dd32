"""HallusionBench (lmms-lab/HallusionBench: image split 951 + non_image split 178).

Layout: parquet ``data/image-*.parquet`` and ``data/non_image-*.parquet`` with
``category`` (VD / VS), ``subcategory``, ``visual_input`` ('0' no image), ``set_id``,
``figure_id``, ``question_id``, ``question``, ``gt_answer`` ('1' yes / '0' no),
``filename`` and ``image`` (HF struct, null for non-image questions).

Rows: VD (visual dependent) rows have visual_input 1 (original figure, figure_id 0) or
2 (edited figures, figure_id 1..); VS (visual supplement) rows with an image have
figure_id 1.. (visual_input 1 or 2); the 178 non-image questions are VS rows with
figure_id 0 and visual_input 0.

Metric (official ``utils.py`` of tianyi-lab/HallusionBench): aAcc = question accuracy
(``get_eval_all``); fAcc = share of figures (category, subcategory, set_id, figure_id)
whose questions are ALL right, leaving out the VS rows with figure_id 0, which have no
figure (``get_eval_fig``); qAcc = share of questions (category, subcategory, set_id,
question_id) right on ALL their figures, the no-figure version included
(``get_eval_pair_all``). Reported score = (aAcc + fAcc + qAcc) / 3.
Official leniency (``assign_correctness``): on the no-figure VS rows an "uncertain"
reply counts as right; here a reply that says neither yes nor no is the uncertain one.
VLMEvalKit and lmms-eval score the 951 image rows only (put only the image split in the
folder to match them).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark, Scoring
from vaopd_jax.eval.benchmarks.common import BadRecord, Record


def _all_right_share(rows: Sequence[dict], k: int, key: str) -> float:
    groups: dict = defaultdict(list)
    for row in rows:
        groups[row["meta"][key]].append(bool(row["correct"][k]))
    return float(np.mean([all(v) for v in groups.values()])) if groups else float("nan")


def has_no_figure(meta: dict) -> bool:
    """A VS row with figure_id 0: the question asked without any figure (official: no figure)."""
    if "no_figure" in meta:
        return bool(meta["no_figure"])
    group = meta["figure_group"]  # rows written before the flag existed: category_subcategory_set_figure
    return group.startswith("VS_") and group.endswith("_0")


def hallusion_metrics(rows: Sequence[dict], k: int) -> dict:
    """aAcc, fAcc, qAcc (fractions) of sample run k."""
    return {
        "aAcc": common.sample_accuracy(rows, k),
        "fAcc": _all_right_share([r for r in rows if not has_no_figure(r["meta"])], k, "figure_group"),
        "qAcc": _all_right_share(rows, k, "question_group"),
    }


class HallusionBench(Benchmark):
    name = "hallusionbench"
    display = "HallusionBench"
    group = "visual"
    patterns = ("**/image-*.parquet", "**/non_image-*.parquet")
    required_columns = ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer")
    official_uses_judge = False
    protocol = ("rule yes/no extraction; (aAcc + fAcc + qAcc) / 3, fAcc over figures (no-figure VS rows left "
                "out, official get_eval_fig)")
    leniency = "a reply that is neither yes nor no counts as right on the no-figure VS rows (official)"

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
                "no_figure": category == "VS" and figure_id == "0",
            },
        )

    def kind(self, record: Record) -> str:
        return common.KIND_YESNO

    def uncertain_is_correct(self, record: Record) -> bool:
        return has_no_figure(record.meta)

    def aggregate(self, rows: Sequence[dict], num_samples: int, scoring: Scoring = Scoring()) -> dict:
        runs = [hallusion_metrics(rows, k) for k in range(num_samples)]
        means = {name: float(np.mean([r[name] for r in runs])) for name in ("aAcc", "fAcc", "qAcc")}
        return {
            "score": 100.0 * float(np.mean(list(means.values()))),
            **{name: 100.0 * value for name, value in means.items()},
            "figures": len({r["meta"]["figure_group"] for r in rows if not has_no_figure(r["meta"])}),
            "no_figure_questions": sum(has_no_figure(r["meta"]) for r in rows),
        }
