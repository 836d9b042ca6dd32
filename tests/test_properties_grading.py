"""Properties of answer extraction and grading (eval/grading.py, eval/validation.py), by hypothesis.

- extraction never raises on any string (empty, any unicode, unpaired surrogates, NUL, unbalanced braces) and
  returns a piece of its input;
- a balanced box is found and its content returned, whatever text precedes it (if that text commits nothing);
- a committed answer grades as correct against itself; grading returns one bool per pair and never raises,
  whatever the strings (the grading workers speak JSON lines: newlines, NUL and surrogates must survive);
- a non-string response is refused with TypeError, as the release does.
Example counts: tests/hypothesis_profiles.py (`cases`).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypothesis_profiles import cases
from vaopd_jax.eval import grading, validation

ANY_TEXT = st.one_of(st.text(), st.text(st.characters(codec=None, categories=None)),
                     st.text(alphabet="\\{}boxed Answer:答案是为最终 final The answer is$*\n\t.()AB0123",
                             max_size=60))
# Text that commits no answer: no box command, no marker word.
PLAIN = st.text(alphabet="xyz 0123456789+-=,.\n", max_size=30)
BALANCED = st.recursive(st.text(alphabet="xyz0123456789+-*/^ .", max_size=6),
                        lambda inner: st.builds(lambda a, b: f"{a}{{{b}}}", inner, inner), max_leaves=5)


@cases(200)
@given(text=ANY_TEXT)
def test_extraction_never_raises_and_returns_part_of_its_input(text):
    boxed = grading.extract_boxed(text)
    assert boxed is None or boxed in text
    answer = grading.extract_answer(text)
    assert answer is None or isinstance(answer, str)
    committed = validation.first_committed_answer(text)
    assert isinstance(committed, str) and committed in text
    assert isinstance(grading.normalize_answer(text), str)
    choice = grading.extract_choice(text, options=["1", "2", "3"])
    assert choice is None or choice in "ABC"
    assert grading.exact_match(text, text)
    assert grading.normalized_match(text, text) == bool(grading.normalize_answer(text))


@cases(100)
@given(prefix=PLAIN, content=BALANCED, suffix=ANY_TEXT)
def test_the_first_balanced_box_is_the_committed_answer(prefix, content, suffix):
    text = f"{prefix}\\boxed{{{content}}}{suffix}"
    assert grading.extract_boxed(text) == content.strip()
    if content.strip():
        assert validation.first_committed_answer(text) == content.strip()


@cases(20)
@given(pairs=st.lists(st.tuples(ANY_TEXT, ANY_TEXT), min_size=1, max_size=6))
def test_grading_returns_one_bool_per_pair_and_never_raises(pairs):
    texts, golds = [t for t, _ in pairs], [g for _, g in pairs]
    results = validation.grade_validation_responses(texts, golds, timeout_s=5.0)
    assert len(results) == len(pairs) and all(isinstance(r, bool) for r in results)
    assert all(isinstance(r, bool) for r in grading.grade_batch(texts, golds, timeout_s=5.0))


@cases(20)
@given(answers=st.lists(st.one_of(BALANCED, st.text(alphabet="0123456789./", min_size=1, max_size=6)),
                        min_size=1, max_size=6))
def test_an_answer_grades_correct_against_itself(answers):
    answers = [a for a in answers if a.strip()] or ["1"]
    texts = [f"The figure gives \\boxed{{{a}}}." for a in answers]
    assert validation.grade_validation_responses(texts, answers, timeout_s=5.0) == [True] * len(answers)


@cases(20)
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text(), max_size=2)))
def test_a_non_string_response_is_refused(value):
    with pytest.raises(TypeError, match="a model response must be a string"):
        validation.first_committed_answer(value)
