"""Training-time validation grading (checkpoint selection), exactly as the authors' release does it.

The release (handsome-rich/VA-OPD) scores its Geometry3K validation rollouts with
``va_opd/rewards.py``: the earliest committed answer of each response
(``va_opd/evaluation.py::first_committed_answer``), graded by ``mathruler.grader.grade_answer``
against the dataset's answer string. Its extraction rules, restated:

- candidates are every balanced ``\\boxed{...}`` (a brace preceded by an odd number of backslashes is
  literal; an empty box is no candidate) and every answer marker (case-insensitive): ``Answer:``,
  ``Final answer:``, ``The answer is`` (whole words), ``答案`` / ``最终答案`` followed by ``：``, ``:``,
  ``是`` or ``为``;
- a marker's answer is the rest of its line (after spaces/tabs); a marker followed by nothing or by a
  line break commits nothing (a later answer is not read in its place); if that line is a box (only
  ``$``, ``*``, ``:`` and spaces before it) the answer is the box's content; otherwise the line with
  a trailing ``。`` and one trailing ``.`` removed and ``*``, ``$`` and spaces stripped at both ends;
- the candidate that starts earliest in the text wins; with no candidate the raw text is the answer.

Benchmarks keep their own extraction and scorers (``vaopd_jax.eval.grading``,
``vaopd_jax.eval.benchmarks``); this module is only the validation accuracy the trainer logs and
selects the best checkpoint by.

mathruler's ``grade_answer`` may call ``sympy.simplify``, which can hang: it runs in the grading
worker processes of ``vaopd_jax.eval.grading`` with a wall-clock limit per answer (over the limit:
wrong, counted and logged).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from vaopd_jax.eval import grading

_BOX_OPEN = re.compile(r"\\boxed\s*\{")
_MARKER = re.compile(
    r"\b(?:final\s+answer\s*:|answer\s*:|the\s+answer\s+is\b)|(?:最终\s*)?答案\s*(?:[：:]|是|为)",
    re.IGNORECASE,
)


def _escaped(text: str, index: int) -> bool:
    """Whether text[index] is preceded by an odd number of backslashes (a literal brace)."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _box_content(text: str, body_start: int) -> Optional[str]:
    """Stripped content of the box whose body starts at body_start; None if unbalanced or empty."""
    depth = 1
    for index in range(body_start, len(text)):
        char = text[index]
        if char not in "{}" or _escaped(text, index):
            continue
        depth += 1 if char == "{" else -1
        if depth == 0:
            return text[body_start:index].strip() or None
    return None


def _marker_payload(text: str, marker_end: int) -> Optional[str]:
    """The answer a marker commits to (the rest of its line), or None when the line is empty."""
    rest = text[marker_end:].lstrip(" \t")
    if not rest or rest[0] in "\r\n":
        return None
    line = rest.splitlines()[0].strip()
    box = _BOX_OPEN.search(line)
    if box is not None and not line[: box.start()].strip(" $*:"):
        return _box_content(line, box.end())
    value = line.rstrip("。")
    if value.endswith("."):
        value = value[:-1].rstrip()
    return value.strip("*$ ") or None


def first_committed_answer(text: str) -> str:
    """The earliest committed answer of a response (box or marker), else the raw text.

    Raises:
      TypeError: text is not a string (as the release does).
    """
    if not isinstance(text, str):
        raise TypeError(f"a model response must be a string, got {type(text).__name__}")
    best: Optional[tuple[int, str]] = None
    for match in _BOX_OPEN.finditer(text):
        answer = _box_content(text, match.end())
        if answer is not None and (best is None or match.start() < best[0]):
            best = (match.start(), answer)
    for match in _MARKER.finditer(text):
        if best is not None and match.start() >= best[0]:
            continue
        answer = _marker_payload(text, match.end())
        if answer is not None:
            best = (match.start(), answer)
    return text if best is None else best[1]


def grade_validation_batch(
    answers: Sequence[str], golds: Sequence[str], *, timeout_s: float = 5.0
) -> list[grading.GradeResult]:
    """mathruler ``grade_answer(answer, gold)`` of each pair, in the grading workers (time-limited).

    Raises:
      ImportError: mathruler (or the sympy / pylatexenc it imports without declaring them) is missing.
      ValueError: the two lists differ in length.
    """
    if len(answers) != len(golds):
        raise ValueError(f"grade_validation_batch: {len(answers)} answers but {len(golds)} gold answers")
    try:
        import mathruler.grader  # noqa: F401 - fail here, naming the packages, not in a worker
    except ImportError as err:
        raise ImportError("validation grading needs mathruler with sympy and pylatexenc "
                          f"(pip install mathruler sympy pylatexenc): {err}") from err
    return grading.grade_pairs([(str(a), str(g)) for a, g in zip(answers, golds)], grader="mathruler",
                               timeout_s=timeout_s)


def grade_validation_responses(
    texts: Sequence[str], golds: Sequence[str], *, timeout_s: float = 5.0
) -> list[bool]:
    """Validation correctness of each response: first_committed_answer, then mathruler's grade_answer."""
    answers = [first_committed_answer(text) for text in texts]
    return [result.correct for result in grade_validation_batch(answers, golds, timeout_s=timeout_s)]


# ----------------------------------------------------------------------------- the trainer's validation
def _student_va_sums(params, batch, graphdef, valid_vocab_size, chunk_size):
    """Sum of the student's own VA, max(0, log p_S(y|v) - log p_S(y|v~)), over valid tokens, and their count."""
    from flax import nnx

    from vaopd_jax.distill import objective, teacher

    logp_orig, logp_pix = teacher.two_view_logprobs(nnx.merge(graphdef, params), batch,
                                                    valid_vocab_size=valid_vocab_size, chunk_size=chunk_size)
    va = objective.visual_advantage(logp_orig, logp_pix, batch.response_mask)
    return (va * batch.response_mask).sum(), batch.response_mask.sum()


_VA_SUMS = {}  # one jitted function per process (shared by every run of a study)


def validate_student(params, graphdef, prompt_batches, sampler, tokenizer, *, seed: int, step: int, mesh,
                     kl_chunk_size: int) -> dict:
    """Validation accuracy (overall and per question kind) and the student's mean VA on the held-out prompts.

    prompt_batches: `data.batch.PromptBatch`es (no filler rows) with both views; sampler: the validation
    `rollout.Sampler`. Every process holds the whole (small) validation set, samples it with the same keys and
    grades it like the release, so the results agree without a gather.
    """
    import jax
    import numpy as np

    from vaopd_jax.data import tokenizer as tokenizer_lib
    from vaopd_jax.distill import batch as train_batch_lib
    from vaopd_jax.parallel.multihost import host

    if not _VA_SUMS:
        _VA_SUMS["fn"] = jax.jit(_student_va_sums, static_argnames=("graphdef", "valid_vocab_size", "chunk_size"))
    model_cfg = sampler.config
    valid_vocab_size = tokenizer_lib.valid_vocab_size(tokenizer, model_cfg.text.vocab_size)
    counts: dict[str, list[int]] = {}  # kind -> [correct, total]
    va_sum = va_count = 0.0
    for i, batch in enumerate(prompt_batches):
        out = sampler(params, batch, jax.random.fold_in(jax.random.key(seed + 7), step * 1000 + i))
        tokens, mask = host(out.tokens), host(out.response_mask)
        texts = tokenizer.batch_decode([t[m > 0] for t, m in zip(tokens, mask)], skip_special_tokens=True)
        golds = [str(a) for a in np.repeat(batch.answer, sampler.num_samples)]
        for ok, kind in zip(grade_validation_responses(texts, golds), np.repeat(batch.kind, sampler.num_samples)):
            tally = counts.setdefault(str(kind) or "all", [0, 0])
            tally[0], tally[1] = tally[0] + int(ok), tally[1] + 1
        train_batch = train_batch_lib.build_train_batch(batch, tokens, mask, sampler.num_samples, model_cfg)
        total, count = _VA_SUMS["fn"](params, train_batch_lib.shard_batch(train_batch, mesh), graphdef=graphdef,
                                      valid_vocab_size=valid_vocab_size, chunk_size=kl_chunk_size)
        va_sum, va_count = va_sum + float(total), va_count + float(count)
    result = {"accuracy": sum(c for c, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1),
              "student_va_mean": va_sum / max(va_count, 1.0)}
    if len(counts) > 1:
        result.update({f"accuracy_{kind}": c / n for kind, (c, n) in sorted(counts.items())})
    return result
