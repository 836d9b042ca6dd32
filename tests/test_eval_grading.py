"""Answer extraction, normalization, choice matching and math-verify grading."""

import time

import pytest

from vaopd_jax.eval import grading


# ---- extraction ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("So x = \\boxed{5}.", "5"),
        ("First \\boxed{\\frac{3}{2}} then \\boxed{7}", "\\frac{3}{2}"),  # first box wins
        ("\\boxed{\\sqrt{2 \\cdot {3}}} done", "\\sqrt{2 \\cdot {3}}"),  # nested braces
        ("\\boxed{ \\{1, 2\\} }", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("cut \\boxed{3 + {4 and then \\boxed{9}", "9"),  # unbalanced box skipped
        ("\\fbox{B}", "B"),
        ("\\boxed 42 is it", "42"),
        ("Reasoning...\nAnswer: 17^\\circ\nmore", "17^\\circ"),
        ("Reasoning\n**Answer:** $2\\sqrt{221}$.", "2\\sqrt{221}"),
        ("Final Answer: (B)", "(B)"),
        ("Answer:\n\n  12 cm\n", "12 cm"),
        ("line one\nthe answer: 3\nAnswer: 4", "3"),
        ("Answer: 4 and \\boxed{5}", "5"),  # a box anywhere takes precedence
        ("no committed answer here", None),
        ("", None),
        (None, None),
        ("<think>maybe \\boxed{1}</think> so \\boxed{2}", "2"),
        ("<think>maybe \\boxed{1} and then the budget ran out", None),
    ],
)
def test_extract_answer(text, expected):
    assert grading.extract_answer(text) == expected


def test_extract_boxed_ignores_other_commands():
    assert grading.extract_boxed("\\boxedsymbol{1} \\boxed{2}") == "2"
    assert grading.extract_boxed("no box") is None


# ---- normalization ------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("2 \\sqrt { 221 }", "2\\sqrt{221}"),
        ("\\frac { 3 } { 2 }", "\\frac{3}{2}"),
        ("\\dfrac{3}{2}", "\\frac{3}{2}"),
        ("17^\\circ", "17"),
        ("17^{\\circ}", "17"),
        ("17°", "17"),
        ("$1,000$.", "1000"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("25\\%", "25"),
        ("\\text{Yes}", "yes"),
        ("3\\,\\text{cm}", "3cm"),
    ],
)
def test_normalize_answer(raw, expected):
    assert grading.normalize_answer(raw) == expected


def test_exact_and_normalized_match():
    assert grading.exact_match(" 5 ", "5")
    assert not grading.exact_match("5.0", "5")
    assert not grading.exact_match(None, "5")
    assert grading.normalized_match("5.0", "5")
    assert grading.normalized_match("0.50", ".5")
    assert grading.normalized_match("x = 5", "5")
    assert grading.normalized_match("2\\sqrt{221}", "2 \\sqrt { 221 }")
    assert grading.normalized_match("17", "17^\\circ")
    assert not grading.normalized_match("5.01", "5")
    assert not grading.normalized_match("", "")
    assert not grading.normalized_match("(1,2)", "(2,1)")


# ---- multiple choice ----------------------------------------------------------------

OPTIONS = ["30°", "45°", "60°", "90°"]


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. 45°", "B"),
        ("(C) 60", "C"),
        ("Option D", "D"),
        ("The answer is (A)", "A"),
        ("45^\\circ", "B"),  # option text, LaTeX degrees
        ("60", "C"),  # option text without the unit
        ("\\text{A}", "A"),
        ("b", "B"),  # lower-case letter accepted when options are known
        ("E", None),  # out of range for 4 options
        ("75°", None),
        (None, None),
    ],
)
def test_extract_choice_with_options(pred, expected):
    assert grading.extract_choice(pred, OPTIONS) == expected


def test_extract_choice_without_options():
    assert grading.extract_choice("C") == "C"
    assert grading.extract_choice("a") is None  # ambiguous without options (article / variable)
    assert grading.extract_choice("45") is None


def test_extract_choice_ambiguous_text():
    # Two options with the same text: the text alone does not commit to one letter.
    assert grading.extract_choice("1", ["1", "2", "1"]) is None


# ---- math-verify grading ------------------------------------------------------------

def test_grade_free_form_math():
    preds = [
        "17^\\circ",  # degrees vs plain number
        "2\\sqrt{221}",  # LaTeX spacing
        "1.5",  # \frac { 3 } { 2 }
        "\\frac{\\sqrt2}{2}",  # needs math-verify (symbolic)
        "3/2",
        "4",
        None,
        "   ",
        "\\frac{1}{3}",
    ]
    golds = [
        "17",
        "2 \\sqrt { 221 }",
        "\\frac { 3 } { 2 }",
        "\\sqrt{2}/2",
        "\\boxed{1.5}",  # ViRL39K-style boxed gold
        "5",
        "5",
        "5",
        "0.3333",
    ]
    details = grading.grade_batch_detailed(preds, golds, timeout_s=20.0)
    assert [d.correct for d in details] == [True, True, True, True, True, False, False, False, False]
    assert details[0].status == "normalized"  # cheap path, no worker round trip
    assert details[3].status == "verified"
    assert details[5].status == "rejected"
    assert details[6].status == "empty"
    assert grading.grade("\\frac{6}{4}", "\\frac { 3 } { 2 }", timeout_s=20.0)
    assert grading.grade_responses(["so \\boxed{17^\\circ}.", "Answer: 16"], ["17", "17"], timeout_s=20.0) == [
        True,
        False,
    ]


def test_grade_batch_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        grading.grade_batch(["1", "2"], ["1"])


def test_timeout_counts_as_wrong_and_pool_recovers(caplog):
    # 9^(9^(9^9)) makes sympy grind in C code that not even signal.alarm interrupts: the
    # worker must be killed from outside, the item scored wrong, and grading continue.
    before = grading.grading_counters()["timeouts"]
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="vaopd_jax.eval.grading"):
        details = grading.grade_batch_detailed(
            ["9^{9^{9^{9}}}", "\\frac{\\sqrt2}{2}"], ["1", "\\sqrt{2}/2"], timeout_s=2.0
        )
    elapsed = time.monotonic() - start
    assert details[0] == grading.GradeResult(False, "timeout")
    assert details[1] == grading.GradeResult(True, "verified")
    assert grading.grading_counters()["timeouts"] == before + 1
    assert any("counted as wrong" in r.message for r in caplog.records)
    assert elapsed < 30.0
    # The replacement worker grades normally.
    assert grading.grade("\\frac{2}{4}", "0.5", timeout_s=20.0)


def test_grading_works_off_the_main_thread():
    import threading

    out = {}

    def run():
        out["result"] = grading.grade_batch(["\\sqrt{4}", "3"], ["2", "2"], timeout_s=20.0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert out["result"] == [True, False]


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        grading.VerifyPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        grading.VerifyPool(num_workers=1).run([("1", "1")], timeout_s=0)
