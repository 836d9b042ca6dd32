"""Validation grading as the release does it: earliest committed answer, else the raw text; mathruler."""

import pytest

from vaopd_jax.eval import grading, validation

# (response, Geometry3K-style gold, the answer the release extracts, mathruler's verdict)
CASES = [
    ("Answer: 3\nLet me double-check... so \\boxed{4}", "3", "3", True),  # the earlier commitment wins
    ("The area is \\boxed{4}. Answer: 3", "4", "4", True),
    ("The answer is 12.", "12", "12", True),
    ("5", "5", "5", True),  # no commitment: the raw text is graded
    ("答案：7", "7", "7", True),
    ("所以答案是 8。", "8", "8", True),
    ("最终答案为\\boxed{9}", "9", "9", True),
    ("Final answer: $2\\sqrt{221}$", "2 \\sqrt { 221 }", "2\\sqrt{221}", True),
    ("**Answer:** 45", "45", "45", True),
    ("Answer:\n45", "45", "Answer:\n45", False),  # a marker with nothing on its line commits nothing
    ("\\boxed{\\frac{3}{2}}", "\\frac { 3 } { 2 }", "\\frac{3}{2}", True),
    ("So x = \\boxed{1.5}", "\\frac { 3 } { 2 }", "1.5", True),
    ("\\boxed{}", "1", "\\boxed{}", False),  # an empty box is no candidate
    ("\\boxed{\\frac{1}{2}", "\\frac { 1 } { 2 }", "\\boxed{\\frac{1}{2}", True),  # unbalanced: raw text
    ("the answer is 6, not 7", "6", "6, not 7", False),
    ("Answer: \\boxed{10} degrees", "10", "10", True),
    ("answer: 11.", "11", "11", True),
    ("ANSWER: 13", "13", "13", True),
    ("We get 14. The answer is 15.", "15", "15", True),
    ("x = 16", "16", "x = 16", True),
    ("The answer is: 17", "17", ": 17", False),
    ("My final answer: 18 cm", "18", "18 cm", True),
    ("Answer: \\boxed{19", "19", "Answer: \\boxed{19", False),  # the box on the marker's line is unbalanced
    ("Answers: 20", "20", "Answers: 20", False),  # not a marker
    ("\\boxed{2\\sqrt{221}}", "2 \\sqrt { 221 }", "2\\sqrt{221}", True),
    ("The answer is $\\frac{3}{2}$.", "\\frac { 3 } { 2 }", "\\frac{3}{2}", True),
    ("Answer: 21\nAnswer: 22", "22", "21", False),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", "\\{1,2\\}", True),  # escaped braces are literal
    ("<think>Answer: 1</think>\\boxed{23}", "23", "1</think>\\boxed{23}", False),  # no think stripping
    ("", "0", "", False),
]


@pytest.mark.parametrize("response,gold,answer,_", CASES)
def test_first_committed_answer_follows_the_release(response, gold, answer, _):
    assert validation.first_committed_answer(response) == answer


def test_validation_verdicts_with_mathruler():
    verdicts = validation.grade_validation_responses([c[0] for c in CASES], [c[1] for c in CASES])
    assert verdicts == [c[3] for c in CASES]
    # The benchmarks' own extraction (first box anywhere, else an Answer: line) and math-verify disagree on
    # these; validation follows the release.
    old = grading.grade_responses([c[0] for c in CASES], [c[1] for c in CASES])
    differ = [c[0] for c, new_ok, old_ok in zip(CASES, verdicts, old) if new_ok != old_ok]
    assert {"Answer: 3\nLet me double-check... so \\boxed{4}", "The answer is 12.", "5", "答案：7"} <= set(differ)


def test_grade_pairs_uses_the_named_grader_and_caches():
    results = grading.grade_pairs([("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}")], grader="mathruler")
    assert [r.correct for r in results] == [True, True] and {r.status for r in results} == {"verified"}
    # mathruler refuses an unreduced fraction; math-verify accepts it
    assert grading.grade_pairs([("\\frac{2}{4}", "\\frac{1}{2}")], grader="mathruler")[0].correct is False
    assert grading.grade_pairs([("\\frac{2}{4}", "\\frac{1}{2}")], grader="math_verify")[0].correct is True
    assert ("\\frac{2}{4}", "\\frac{1}{2}", "mathruler") in grading._CACHE
    with pytest.raises(ValueError, match="grader"):
        grading.grade_pairs([("1", "1")], grader="sympy")
    with pytest.raises(TypeError):
        validation.first_committed_answer(None)
    with pytest.raises(ValueError, match="2 answers but 1"):
        validation.grade_validation_batch(["1", "2"], ["1"])
