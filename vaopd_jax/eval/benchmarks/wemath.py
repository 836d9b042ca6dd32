"""WeMath (We-Math/We-Math, testmini, 1,740 rows in 525 linked groups).

Layout: parquet ``testmini*.parquet`` with columns ``ID`` (group id), ``question``,
``option`` (``"A. 1; B. 2; ..."``), ``answer`` (letter), ``key`` (``2steps_1``,
``2steps_2``, ``2steps_multi``, ``3steps_1..3``, ``3steps_multi``), ``knowledge
concept``, and the image as an HF struct in ``image`` (or ``image_path`` in the
released parquet).

Metric (We-Math/We-Math ``evaluation/four_dimensional_metrics.py``, VLMEvalKit
``wemath``): each group is one multi-step problem and its one-step sub-problems. The
official code splits the rows into 2-step and 3-step problems first and groups each
part by ``ID`` (the same ID can name a 2-step and a 3-step group), so a group here is
(steps, ID). With "all sub-problems right" (strict) or "any sub-problem right" (loose):
  IK insufficient knowledge  = multi wrong and not all subs right
  IG inadequate generalization = multi wrong and all subs right
  CM complete mastery        = multi right and all (strict) / any (loose) subs right
  RM rote memorization       = multi right and not all (strict) / no (loose) subs right
  score = (N - 0.5 IG - RM - IK) / N;  reported score = (strict + loose) / 2.
The official code divides by the 525 groups of testmini; here N is the number of
complete groups read (525 on the full testmini), and the summary says how many there were.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.base import Benchmark, Scoring
from vaopd_jax.eval.benchmarks.common import BadRecord, Record

_OPTION = re.compile(r"(?:^|[;；]\s*)([A-H])[.．、:]\s*")
OFFICIAL_GROUPS = 525  # testmini: 360 two-step + 165 three-step problems (1,740 rows)
GROUP_KEYS = {
    2: ("2steps_1", "2steps_2", "2steps_multi"),
    3: ("3steps_1", "3steps_2", "3steps_3", "3steps_multi"),
}


def parse_options(text: str) -> list[str]:
    """'A. 1; B. 2' -> ['1', '2'] (letters must run A, B, C, ... in order)."""
    text = str(text).strip()
    matches = list(_OPTION.finditer(text))
    options, letters = [], []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        options.append(text[match.end() : end].strip().rstrip(";；").strip())
        letters.append(match.group(1))
    if len(options) < 2 or "".join(letters) != common.LETTERS[: len(letters)] or not all(options):
        raise BadRecord(f"cannot parse WeMath options {text[:120]!r} (expected 'A. ...; B. ...')")
    return options


def group_id(meta: dict) -> tuple[str, str]:
    """(steps, ID) of a row: '2' or '3' from its key, then the We-Math ID."""
    return meta["key"].split("steps")[0], meta["group"]


def group_counts(groups: dict) -> dict:
    """IK / IG / CM / RM counts (strict and loose) over complete groups.

    groups: {(steps, ID): {key: correct}}; groups without a complete key set are not
    counted (returned as 'incomplete').
    """
    counts = {"IK": 0, "IG": 0, "CM_strict": 0, "RM_strict": 0, "CM_loose": 0, "RM_loose": 0,
              "groups": 0, "incomplete": 0}
    for values in groups.values():
        keys = GROUP_KEYS[3] if any(key.startswith("3steps") for key in values) else GROUP_KEYS[2]
        if set(values) != set(keys):
            counts["incomplete"] += 1
            continue
        subs = [bool(values[k]) for k in keys[:-1]]
        multi = bool(values[keys[-1]])
        counts["groups"] += 1
        if not multi:
            counts["IG" if all(subs) else "IK"] += 1
        else:
            counts["CM_strict" if all(subs) else "RM_strict"] += 1
            counts["CM_loose" if any(subs) else "RM_loose"] += 1
    return counts


def four_dim_scores(groups: dict) -> dict:
    """Strict and loose scores (fractions) and rates of the 4-D metric."""
    c = group_counts(groups)
    n = c["groups"]
    if n == 0:
        return {"strict": float("nan"), "loose": float("nan"), **c}
    strict = (n - 0.5 * c["IG"] - c["RM_strict"] - c["IK"]) / n
    loose = (n - 0.5 * c["IG"] - c["RM_loose"] - c["IK"]) / n
    return {"strict": strict, "loose": loose, **c}


class WeMath(Benchmark):
    name = "wemath"
    display = "WeMath"
    group = "math"
    patterns = ("**/testmini*.parquet", "**/*.parquet")
    required_columns = ("ID", "question", "option", "answer", "key")
    protocol = "rule: (strict + loose) / 2 of the 4-D metric (IK, IG, CM, RM) over linked groups"

    def parse_row(self, row: dict, path: Path, index: int) -> Record:
        rid = f"{common.clean_str(row.get('ID'))}:{common.clean_str(row.get('key'))}"
        common.require(row, ("ID", "question", "option", "answer", "key"), rid)
        key = str(row["key"])
        if not re.fullmatch(r"[23]steps_(?:\d|multi)", key):
            raise BadRecord(f"record {rid}: key {key!r} is not one of 2steps_1..multi / 3steps_1..multi")
        options = parse_options(row["option"])
        answer = str(row["answer"]).strip().upper()
        if answer not in common.LETTERS[: len(options)]:
            raise BadRecord(f"record {rid}: answer {answer!r} is not a letter of its {len(options)} options")
        image = common.image_ref(row.get("image", row.get("image_path")), path.parent)
        if image is None:
            raise BadRecord(f"record {rid}: no image")
        question = f"{str(row['question']).strip()}\nOptions:\n{common.format_options(options)}"
        return Record(
            id=rid, question=question, images=(image,), answer=answer,
            meta={"options": options, "group": str(row["ID"]), "key": key},
        )

    def kind(self, record: Record) -> str:
        return common.KIND_CHOICE

    def aggregate(self, rows: Sequence[dict], num_samples: int, scoring: Scoring = Scoring()) -> dict:
        per_run = []
        for k in range(num_samples):
            groups: dict = defaultdict(dict)
            for row in rows:
                groups[group_id(row["meta"])][row["meta"]["key"]] = bool(row["correct"][k])
            per_run.append(four_dim_scores(groups))
        strict = float(np.mean([r["strict"] for r in per_run]))
        loose = float(np.mean([r["loose"] for r in per_run]))
        n = per_run[0]["groups"] if per_run else 0
        rates = {
            name: float(np.mean([r[name] / r["groups"] for r in per_run])) if n else float("nan")
            for name in ("IK", "IG", "CM_strict", "RM_strict", "CM_loose", "RM_loose")
        }
        return {
            "score": 100.0 * (strict + loose) / 2.0,
            "strict": 100.0 * strict,
            "loose": 100.0 * loose,
            "accuracy": common.run_means(rows, common.sample_accuracy, num_samples),
            "groups": n,
            "official_groups": OFFICIAL_GROUPS,
            "incomplete_groups": per_run[0]["incomplete"] if per_run else 0,
            "rates": rates,
        }
