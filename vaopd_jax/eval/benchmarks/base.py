"""The Benchmark base class: read local files, grade num_samples samples per record, aggregate.

Subclasses set the class attributes and implement ``parse_row`` (one parquet row ->
Record) and, where the metric is not plain accuracy, ``aggregate``. Where an official
scorer is lenient (an answer nothing parses still gets an option, "uncertain" counts as
right), the subclass implements the rule in ``fallback_choice`` / ``uncertain_is_correct``
and names it in ``leniency``; ``Scoring.mode`` chooses it ('official') or not ('strict').
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from vaopd_jax.eval import grading
from vaopd_jax.eval.benchmarks import common
from vaopd_jax.eval.benchmarks.common import BadRecord, ReadResult, Record

SCORING_MODES = ("official", "strict")
MMSTAR_AVERAGES = ("rows", "l2_categories")


class Scoring(NamedTuple):
    """How samples are scored (evaluator ``config.scoring`` / ``config.mmstar_average``).

    mode: 'official' applies each official scorer's leniency (Benchmark.leniency); 'strict'
      counts an answer nothing parses as wrong and compares OCRBench HME100k answers as written.
    mmstar_average: 'rows' (VLMEvalKit: mean over all questions) or 'l2_categories'
      (lmms-eval: mean of the per-l2_category means); both are reported.
    """

    mode: str = "official"
    mmstar_average: str = "rows"

    def check(self) -> "Scoring":
        if self.mode not in SCORING_MODES:
            raise ValueError(f"scoring mode must be one of {SCORING_MODES}, got {self.mode!r}")
        if self.mmstar_average not in MMSTAR_AVERAGES:
            raise ValueError(f"mmstar_average must be one of {MMSTAR_AVERAGES}, got {self.mmstar_average!r}")
        return self


class Benchmark:
    name: str = ""  # registry key and directory name under benchmarks_dir
    display: str = ""  # column header of the paper's table
    group: str = ""  # 'math' | 'visual' (Math avg / Visual avg)
    patterns: tuple = ()  # glob patterns of the split's files, tried in order
    required_columns: tuple = ()
    # Where the official protocol extracts answers with an LLM judge; without a judge
    # the rule-based extraction is used and the summary says so.
    official_uses_judge: bool = False
    protocol: str = ""  # one line for the summary: how the official score is computed
    leniency: str = ""  # the official scorer's leniency applied in Scoring.mode 'official' ('' = none)

    # ---- reading ---------------------------------------------------------------------

    def locate(self, root: Path) -> list[Path]:
        return common.find_files(Path(root), self.patterns, self.name)

    def read(self, root: Path, limit: Optional[int] = None) -> ReadResult:
        """All records under ``root`` (the benchmark's directory); bad rows are listed
        in ``problems`` with their reason. Raises MissingBenchmark / ValueError (bad
        file or columns) naming the file."""
        files = self.locate(root)
        records: list[Record] = []
        problems: list[dict] = []
        seen: set = set()
        for path in files:
            rows = common.read_parquet_rows(path, self.required_columns, self.name)
            for index, row in enumerate(rows):
                fallback_id = f"{path.stem}:{index}"
                try:
                    record = self.parse_row(row, path, index)
                except BadRecord as err:
                    problems.append({"id": fallback_id, "reason": str(err)})
                    continue
                if record.id in seen:
                    problems.append({"id": record.id, "reason": f"duplicate id in {path.name}; row {index} skipped"})
                    continue
                seen.add(record.id)
                records.append(record)
                if limit is not None and len(records) >= limit:
                    return ReadResult(records, [str(f) for f in files], problems)
        return ReadResult(records, [str(f) for f in files], problems)

    def parse_row(self, row: dict, path: Path, index: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- prompting ---------------------------------------------------------------------

    def prompt_text(self, record: Record, suffix: str = "") -> str:
        """The user-turn text (``<image>`` placeholders kept) plus an optional suffix."""
        return record.question + (("\n" + suffix) if suffix else "")

    # ---- grading ---------------------------------------------------------------------

    def kind(self, record: Record) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self, record: Record) -> Optional[list]:
        return record.meta.get("options")

    def golds(self, record: Record) -> list[str]:
        answer = record.answer
        return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]

    def extract_free_form(self, record: Record, text: str) -> Optional[str]:
        return grading.extract_answer(text)

    def grade_free_form(self, record: Record, pred: str) -> Optional[bool]:
        """Benchmark-specific rule for a free-form answer; None -> math-verify decides."""
        return None

    def fallback_choice(self, record: Record, text: str, sample_index: int) -> Optional[tuple[str, str]]:
        """The official scorer's option for a response no rule (or judge) parsed: (letter, label), or
        None to count it wrong. Used only in Scoring.mode 'official'."""
        return None

    def uncertain_is_correct(self, record: Record) -> bool:
        """Whether the official scorer counts a yes/no response that is neither as right."""
        return False

    def ocr_correct(self, record: Record, text: str, scoring: Scoring) -> bool:
        return common.ocr_match(text, self.golds(record))

    def score(
        self,
        records: Sequence[Record],
        responses: Sequence[Sequence[str]],
        *,
        judge=None,
        timeout_s: float = 5.0,
        scoring: Scoring = Scoring(),
    ) -> list[list[tuple]]:
        """Per record, per sample: (extracted answer or None, correct, extractor).

        extractor is 'rule' or 'judge' (the judge is asked only where the rules found
        no answer and the official protocol uses one), or the label of the official
        leniency that decided the sample (``fallback_choice`` / ``uncertain_is_correct``).
        """
        scoring.check()
        official = scoring.mode == "official"
        out: list[list] = [[None] * len(r) for r in responses]
        math_pairs: list[tuple[str, str]] = []
        math_slots: list[tuple[int, int, int]] = []  # (record, sample, number of golds)
        for i, (record, texts) in enumerate(zip(records, responses)):
            kind = self.kind(record)
            for k, text in enumerate(texts):
                extractor = "rule"
                if kind == common.KIND_CHOICE:
                    options = self.options(record)
                    letter = common.extract_choice_from_response(text, options)
                    if letter is None and judge is not None and self.official_uses_judge:
                        letter = judge.extract_choice(record.question, text, options)
                        extractor = "judge"
                    if letter is None and official:
                        fallback = self.fallback_choice(record, text, k)
                        if fallback is not None:
                            letter, extractor = fallback
                    out[i][k] = (letter, letter is not None and letter == str(record.answer).upper(), extractor)
                elif kind == common.KIND_YESNO:
                    yes_no = common.extract_yes_no(text)
                    if yes_no is None and official and self.uncertain_is_correct(record):
                        out[i][k] = (None, True, "uncertain_counts_as_correct")
                        continue
                    out[i][k] = (yes_no, yes_no is not None and yes_no == record.answer, extractor)
                elif kind == common.KIND_OCR:
                    committed = grading.extract_answer(text)
                    shown = committed if committed is not None else (text or "").strip()[:200]
                    out[i][k] = (shown, self.ocr_correct(record, text, scoring), extractor)
                elif kind == common.KIND_MATH:
                    pred = self.extract_free_form(record, text)
                    if pred is None and judge is not None and self.official_uses_judge:
                        pred = judge.extract_answer(record.question, text)
                        extractor = "judge"
                    if pred is None:
                        out[i][k] = (None, False, extractor)
                        continue
                    rule = self.grade_free_form(record, pred)
                    if rule is not None:
                        out[i][k] = (pred, bool(rule), extractor)
                        continue
                    golds = self.golds(record)
                    out[i][k] = (pred, None, extractor)
                    math_slots.append((i, k, len(golds)))
                    math_pairs.extend((pred, g) for g in golds)
                else:
                    raise ValueError(f"{self.name}: unknown grading kind {kind!r} for record {record.id}")
        if math_pairs:
            verdicts = grading.grade_batch([p for p, _ in math_pairs], [g for _, g in math_pairs], timeout_s=timeout_s)
            offset = 0
            for i, k, n in math_slots:
                pred, _, extractor = out[i][k]
                out[i][k] = (pred, any(verdicts[offset : offset + n]), extractor)
                offset += n
        return out

    # ---- aggregation ---------------------------------------------------------------------

    def aggregate(self, rows: Sequence[dict], num_samples: int, scoring: Scoring = Scoring()) -> dict:
        """Score 0-100 (avg@k accuracy) and details from the per-record JSONL rows."""
        accuracy = common.run_means(rows, common.sample_accuracy, num_samples)
        return {"score": 100.0 * accuracy, "accuracy": accuracy}
