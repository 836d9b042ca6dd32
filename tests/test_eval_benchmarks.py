"""Benchmark readers (public layouts, fixture files) and scorers (hand-made predictions)."""

import json

import pytest

from vaopd_jax.eval import benchmarks
from vaopd_jax.eval import judge as judge_lib
from vaopd_jax.eval.benchmarks import common, fixtures, wemath
from vaopd_jax.eval.benchmarks.common import BadRecord, MissingBenchmark


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    fixtures.write_all(root)
    return root


def read(bench_root, name):
    return benchmarks.get(name).read(bench_root / name)


# ---- readers ------------------------------------------------------------------------

def test_registry_order_matches_the_paper_table():
    assert benchmarks.MATH_BENCHMARKS == ("wemath", "mathvista", "mathverse")
    assert benchmarks.VISUAL_BENCHMARKS == ("hallusionbench", "ai2d", "mmmu", "mmstar", "ocrbench")
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'"):
        benchmarks.get("mmbench")


def test_wemath_reader(bench_root):
    result = read(bench_root, "wemath")
    assert result.problems == []
    assert [r.id for r in result.records][:4] == ["7:2steps_1", "7:2steps_2", "7:2steps_multi", "7:3steps_1"]
    record = result.records[0]
    assert record.meta == {"options": ["30°", "45°", "60°", "90°"], "group": "7", "key": "2steps_1"}
    assert record.answer == "B"
    assert "Options:\nA. 30°\nB. 45°" in record.question
    assert record.images[0].load().size == (48, 40)  # from the image_path HF struct


def test_wemath_option_parsing():
    assert wemath.parse_options("A. 1; B. 2；C. three") == ["1", "2", "three"]
    with pytest.raises(BadRecord, match="cannot parse WeMath options"):
        wemath.parse_options("B. 1; A. 2")


def test_mathvista_reader_struct_raw_path_and_missing_file(bench_root):
    result = read(bench_root, "mathvista")
    by_id = {r.id: r for r in result.records}
    assert by_id["1"].answer == "B"  # choice TEXT '45°' -> its letter
    assert by_id["1"].meta["options"] == ["30°", "45°", "60°"]
    assert by_id["1"].question.startswith("Hint:")  # the official `query`
    assert by_id["2"].meta["answer_type"] == "integer"
    # Raw layout: decoded_image null, the image path is relative to the dataset root.
    assert by_id["3"].images[0].data is None
    assert by_id["3"].images[0].load().size == (48, 40)
    # A missing image file is found when the image is loaded, with the path in the message.
    with pytest.raises(BadRecord, match="404.png does not exist"):
        by_id["4"].images[0].load()


def test_mathverse_reader(bench_root):
    records = read(bench_root, "mathverse").records
    assert [(r.id, r.answer, r.meta["question_type"]) for r in records] == [
        ("1", "B", "multi-choice"), ("2", "2\\sqrt{221}", "free-form")]
    assert records[0].question.startswith("Please first conduct reasoning")  # query_cot


def test_mathverse_vision_only_rows_are_read(tmp_path):
    """Vision-Only rows have an empty `question` (the question is in the image) and their text in
    query_cot / query_wo: they are read; a row with none of the three is listed, not dropped silently."""
    rows = fixtures.write_mathverse(tmp_path)
    vision_only = rows[1]
    assert vision_only["problem_version"] == "Vision Only" and vision_only["question"] == ""
    result = benchmarks.get("mathverse").read(tmp_path / "mathverse")
    by_id = {r.id: r for r in result.records}
    assert by_id["2"].question == vision_only["query_cot"] and len(by_id["2"].images) == 1
    assert by_id["2"].meta["problem_version"] == "Vision Only"
    bare = dict(vision_only, sample_index="3", query_cot=None, query_wo="")
    fixtures._write(tmp_path / "mathverse" / "testmini.parquet", rows + [dict(vision_only, sample_index="4",
                                                                              query_cot=""), bare])
    result = benchmarks.get("mathverse").read(tmp_path / "mathverse")
    assert {r.id for r in result.records} == {"1", "2", "4"}
    assert result.records[-1].question == vision_only["query_wo"]  # no query_cot: query_wo
    assert result.problems == [{"id": "testmini:3", "reason": "record 3: query_cot, query_wo and question are "
                                                              "all missing or empty"}]


def test_hallusionbench_reader_reads_both_splits(bench_root):
    records = read(bench_root, "hallusionbench").records
    assert len(records) == 7
    assert records[0].id == "VD_illusion_0_0_0"
    assert records[0].meta == {"figure_group": "VD_illusion_0_0", "question_group": "VD_illusion_0_0",
                               "no_figure": False}  # VD figure 0 is the original figure, not "no figure"
    assert [r.answer for r in records] == ["yes", "no", "no", "yes", "yes", "no", "yes"]
    assert all(len(r.images) == 1 for r in records[:6])
    non_image = records[-1]
    assert non_image.images == () and non_image.id == "VS_chart_1_0_0" and non_image.meta["no_figure"]


def test_ai2d_reader(bench_root):
    records = read(bench_root, "ai2d").records
    assert [r.answer for r in records] == ["A", "B"]  # '0' / '1' option indices -> letters
    assert "A. egg\nB. larva\nC. pupa\nD. adult" in records[0].question


def test_mmmu_reader_multi_image_rows(bench_root):
    by_id = {r.id: r for r in read(bench_root, "mmmu").records}
    assert set(by_id) == {"validation_Art_1", "validation_Art_2", "validation_Math_1"}
    multi = by_id["validation_Art_2"]
    assert multi.meta["options"] == ["<image 3>", "neither", "both"]  # stringified list parsed
    assert len(multi.images) == 3
    # Images in order of first reference: <image 2> then <image 1> in the question, <image 3> in the options.
    assert [ref.path for ref in multi.images] == [
        "validation_Art_2_2.png", "validation_Art_2_1.png", "validation_Art_2_3.png"]
    assert by_id["validation_Math_1"].answer == ["16"]
    assert by_id["validation_Math_1"].meta["question_type"] == "open"
    assert by_id["validation_Math_1"].meta["subject"] == "Math"


def test_mmstar_reader_parses_inline_options(bench_root):
    records = read(bench_root, "mmstar").records
    assert records[0].meta["options"] == ["red", "blue", "green", "purple"]
    with pytest.raises(BadRecord, match="cannot be decoded"):
        records[2].images[0].load()  # the corrupt fixture row


def test_ocrbench_reader_list_answers(bench_root):
    records = read(bench_root, "ocrbench").records
    assert records[2].answer == ["May 5", "5 May"]
    assert records[1].meta["hme"] and not records[0].meta["hme"]


def test_missing_benchmark_and_bad_columns(tmp_path):
    with pytest.raises(MissingBenchmark, match="does not exist"):
        benchmarks.get("ai2d").read(tmp_path / "ai2d")
    (tmp_path / "ai2d").mkdir()
    with pytest.raises(MissingBenchmark, match="no file under"):
        benchmarks.get("ai2d").read(tmp_path / "ai2d")
    fixtures._write(tmp_path / "ai2d" / "data" / "test-0.parquet", [{"question": "q", "answer": "0"}])
    with pytest.raises(ValueError, match=r"lacks columns \['options', 'image'\]"):
        benchmarks.get("ai2d").read(tmp_path / "ai2d")


def test_bad_rows_are_listed_not_dropped_silently(tmp_path):
    rows = [
        {"question": "ok", "options": ["a", "b"], "answer": "1", "image": fixtures.image_struct(1)},
        {"question": "bad index", "options": ["a", "b"], "answer": "5", "image": fixtures.image_struct(2)},
        {"question": "no image", "options": ["a", "b"], "answer": "0", "image": None},
    ]
    fixtures._write(tmp_path / "ai2d" / "data" / "test-0.parquet", rows)
    result = benchmarks.get("ai2d").read(tmp_path / "ai2d")
    assert len(result.records) == 1
    assert [p["id"] for p in result.problems] == ["test-0:1", "test-0:2"]
    assert "answer index 5 outside its 2 options" in result.problems[0]["reason"]
    assert "no image" in result.problems[1]["reason"]


# ---- scorers ------------------------------------------------------------------------

def score(bench_root, name, responses_by_id, mode="official"):
    records = {r.id: r for r in read(bench_root, name).records}
    ids = list(responses_by_id)
    return {rid: [tuple(x) for x in out] for rid, out in zip(ids, benchmarks.get(name).score(
        [records[i] for i in ids], [responses_by_id[i] for i in ids], timeout_s=20.0,
        scoring=benchmarks.Scoring(mode)))}


def test_choice_scoring_letter_and_option_text(bench_root):
    long_reply = "Option A is wrong since the angle is acute.\nLooking again, the correct option is (B)."
    out = score(bench_root, "wemath", {"7:2steps_1": [
        "B", "\\boxed{45^\\circ}", "The answer is (C).", "Answer: B. 45°", "I am not sure", "\\boxed{E}",
        long_reply, "45°", "Step 1: a long derivation\nso 45° it is"]})
    got = out["7:2steps_1"]
    assert [g[0] for g in got] == ["B", "B", "C", "B", None, None, "B", "B", None]
    assert [g[1] for g in got] == [True, True, False, True, False, False, True, True, False]
    assert {g[2] for g in got} == {"rule"}


def test_mathvista_scoring_by_answer_type(bench_root):
    out = score(bench_root, "mathvista", {
        "1": ["\\boxed{B}", "Answer: 45°", "\\boxed{30°}"],
        "2": ["\\boxed{3.0}", "\\boxed{3.7}", "\\boxed{4}"],  # official int(float(x)) truncates
        "3": ["\\boxed{1.249}", "\\boxed{\\frac{5}{4}}", "\\boxed{1.3}"],  # rounded to precision 2
    })
    assert [c for _, c, _ in out["1"]] == [True, True, False]
    assert [c for _, c, _ in out["2"]] == [True, True, False]
    assert [c for _, c, _ in out["3"]] == [True, True, False]


def test_free_form_math_scoring_degrees_and_latex(bench_root):
    out = score(bench_root, "mathverse", {
        "1": ["so \\boxed{B}", "Answer: (B)"],
        "2": ["\\boxed{2 \\sqrt { 221 }}", "\\boxed{\\sqrt{884}}", "Answer: 2\\sqrt{220}", "no answer"],
    })
    assert [c for _, c, _ in out["1"]] == [True, True]
    assert [c for _, c, _ in out["2"]] == [True, True, False, False]
    assert out["2"][3][0] is None
    # \boxed{17^\circ} vs gold 17 through the math path.
    record = common.Record(id="x", question="q", answer="17", meta={"question_type": "free-form"})
    [[(pred, correct, _)]] = benchmarks.get("mathverse").score([record], [["\\boxed{17^\\circ}"]], timeout_s=20.0)
    assert pred == "17^\\circ" and correct


def test_mmmu_scoring_mc_and_open(bench_root):
    out = score(bench_root, "mmmu", {
        "validation_Art_2": ["C", "both", "(A)"],
        "validation_Math_1": ["16", "\\boxed{16.0}", "Answer: 15", "The area is\nprobably 16"],
    })
    assert [c for _, c, _ in out["validation_Art_2"]] == [True, True, False]
    assert [c for _, c, _ in out["validation_Math_1"]] == [True, True, False, False]


def test_mmstar_option_text_and_yes_no(bench_root):
    out = score(bench_root, "mmstar", {"0": ["purple", "D", "\\boxed{A}"]})
    assert [c for _, c, _ in out["0"]] == [True, True, False]
    hb = score(bench_root, "hallusionbench", {"VD_illusion_0_0_0": ["Yes, it is.", "\\boxed{No}", "Maybe yes or no"]})
    assert [(p, c) for p, c, _ in hb["VD_illusion_0_0_0"]] == [("yes", True), ("no", False), (None, False)]


def test_ocrbench_substring_rules(bench_root):
    ids = [r.id for r in read(bench_root, "ocrbench").records]
    responses = {
        ids[0]: ["The word is stop.", "SPOT"],
        # HME100k (gold 'x ^ { 2 } + 1'), official: spaces removed on both sides, case-sensitive
        ids[1]: ["$x^{2}+1$", "x^{3}+1", "X^{2}+1", "x ^ { 2 } + 1 ."],
        ids[2]: ["It says 5 may 2020", "June"],
    }
    out = score(bench_root, "ocrbench", responses)
    assert [[c for _, c, _ in out[i]] for i in ids] == [[True, False], [True, False, False, True], [True, False]]
    strict = score(bench_root, "ocrbench", responses, mode="strict")  # HME100k spaces kept
    assert [c for _, c, _ in strict[ids[1]]] == [False, False, False, True]
    assert [c for _, c, _ in strict[ids[0]]] == [True, False]  # other categories: as official
    assert not common.ocr_match("x ^ { 2 } + 1", ["X ^ { 2 } + 1"], case_sensitive=True, drop_spaces=True)
    assert common.ocr_match("the date:\nMay 5", ["MAY 5"])  # newline -> space, case-insensitive


def test_mathvista_unparsed_choice_goes_to_the_nearest_option_in_official_mode(bench_root):
    from vaopd_jax.eval.benchmarks import mathvista

    # options 30° / 45° / 60°, gold B; Levenshtein('45 deg', options) = 6, 4, 6
    responses = {"1": ["Answer: 45 deg", "", "I am not sure", "\\boxed{C}"]}
    official = score(bench_root, "mathvista", responses)
    assert official["1"] == [("B", True, "nearest_option"), ("A", False, "nearest_option"),
                             ("A", False, "nearest_option"), ("C", False, "rule")]  # ties: the first closest
    strict = score(bench_root, "mathvista", responses, mode="strict")
    assert strict["1"] == [(None, False, "rule"), (None, False, "rule"), (None, False, "rule"), ("C", False, "rule")]
    assert mathvista.nearest_option("60 degrees", ["30°", "45°", "60°"]) == 2
    # free-form questions are never mapped
    assert score(bench_root, "mathvista", {"2": ["no idea"]})["2"] == [(None, False, "rule")]


def test_mmmu_unparsed_choice_gets_a_seeded_random_option_in_official_mode(bench_root):
    import random

    responses = {"validation_Art_2": ["I cannot tell.", "I cannot tell.", "C"], "validation_Math_1": ["no idea"]}
    official = score(bench_root, "mmmu", responses)
    expected = [random.Random(f"mmmu/validation_Art_2/{k}").choice("ABC") for k in range(2)]
    assert [p for p, _, _ in official["validation_Art_2"][:2]] == expected == ["B", "C"]
    assert official["validation_Art_2"] == [("B", False, "random_option"), ("C", True, "random_option"),
                                            ("C", True, "rule")]
    assert score(bench_root, "mmmu", responses) == official  # the same draw on every run
    assert official["validation_Math_1"] == [("no idea", False, "rule")]  # open questions: no draw
    strict = score(bench_root, "mmmu", responses, mode="strict")
    assert [c for _, c, _ in strict["validation_Art_2"]] == [False, False, True]
    with pytest.raises(ValueError, match="scoring mode"):
        score(bench_root, "mmmu", responses, mode="lenient")


def test_mmstar_average_over_rows_and_over_l2_categories():
    rows = [{"meta": {"category": "c", "l2_category": "a"}, "correct": [True]} for _ in range(3)] + [
        {"meta": {"category": "c", "l2_category": "b"}, "correct": [False]}]
    mmstar = benchmarks.get("mmstar")
    by_rows = mmstar.aggregate(rows, 1)
    assert by_rows["score"] == pytest.approx(75.0) and by_rows["average"] == "rows"  # VLMEvalKit
    assert by_rows["accuracy_l2_categories"] == pytest.approx(50.0)  # lmms-eval: mean of 100 and 0
    by_l2 = mmstar.aggregate(rows, 1, benchmarks.Scoring(mmstar_average="l2_categories"))
    assert by_l2["score"] == pytest.approx(50.0) and by_l2["accuracy_rows"] == pytest.approx(75.0)
    assert by_l2["l2_categories"] == {"a": pytest.approx(100.0), "b": pytest.approx(0.0)}


def _rows(meta_list, correct_runs):
    """JSONL-like rows: correct_runs[k][i] is sample k of row i."""
    return [{"meta": meta, "correct": [run[i] for run in correct_runs]} for i, meta in enumerate(meta_list)]


def test_wemath_four_dimensional_metric_multi_step_consistency():
    # The 2-step and the 3-step problem share the ID '7' (as in the release): two groups, split by steps first.
    metas = [{"group": "7", "key": k} for k in ("2steps_1", "2steps_2", "2steps_multi")] + [
        {"group": "7", "key": k} for k in ("3steps_1", "3steps_2", "3steps_3", "3steps_multi")]
    # Run 0: g2 subs right, multi wrong -> IG; g3 one sub wrong, multi right -> RM strict, CM loose.
    run0 = [True, True, False, True, False, True, True]
    run1 = [True] * 7  # complete mastery everywhere
    result = benchmarks.get("wemath").aggregate(_rows(metas, [run0, run1]), num_samples=2)
    # run0: strict (2 - 0.5*1 - 1 - 0)/2 = 0.25, loose (2 - 0.5 - 0 - 0)/2 = 0.75; run1: 1, 1.
    assert result["strict"] == pytest.approx(62.5)
    assert result["loose"] == pytest.approx(87.5)
    assert result["score"] == pytest.approx(75.0)
    assert result["groups"] == 2 and result["incomplete_groups"] == 0 and result["official_groups"] == 525
    assert result["rates"]["IG"] == pytest.approx(0.25)
    # RM loose needs the multi right with NO sub right.
    run2 = [False, False, True, False, False, False, True]
    only = benchmarks.get("wemath").aggregate(_rows(metas, [run2]), num_samples=1)
    assert only["strict"] == pytest.approx(0.0) and only["loose"] == pytest.approx(0.0)
    # A group missing a sub-question is left out and counted.
    partial = benchmarks.get("wemath").aggregate(_rows(metas[1:], [run1[1:]]), num_samples=1)
    assert partial["groups"] == 1 and partial["incomplete_groups"] == 1


def test_hallusionbench_figure_and_question_accuracy(bench_root):
    metas = [r.meta for r in read(bench_root, "hallusionbench").records]
    # VD fig0: q0 T q1 T | VD fig1: q0 F q1 T | VS fig1 q0 T | VS fig2 q0 T | VS no figure q0 F
    result = benchmarks.get("hallusionbench").aggregate(_rows(metas, [[True, True, False, True, True, True, False]]), 1)
    assert result["aAcc"] == pytest.approx(500 / 7)
    # official get_eval_fig: 4 figures (the no-figure VS row is left out, not a 5th "figure"): VD fig0, VS 1, VS 2 right
    assert result["figures"] == 4 and result["no_figure_questions"] == 1
    assert result["fAcc"] == pytest.approx(75.0)
    # questions: VD q0 (F on fig1), VD q1 (T, T), VS q0 (T, T and F without a figure): 1 of 3
    assert result["qAcc"] == pytest.approx(100 / 3)
    assert result["score"] == pytest.approx((500 / 7 + 75 + 100 / 3) / 3)
    # Rows of an older run without the no_figure flag: read from the figure group (VS ..._0).
    old = [{k: v for k, v in m.items() if k != "no_figure"} for m in metas]
    assert benchmarks.get("hallusionbench").aggregate(_rows(old, [[True, True, False, True, True, True, False]]),
                                                      1)["fAcc"] == pytest.approx(75.0)


def test_hallusionbench_uncertain_counts_on_no_figure_rows_only_in_official_mode(bench_root):
    responses = {"VS_chart_1_0_0": ["I cannot know without the chart.", "No."],
                 "VS_chart_1_1_0": ["I cannot tell."], "VD_illusion_0_0_0": ["Hard to say."]}
    official = score(bench_root, "hallusionbench", responses)
    assert official["VS_chart_1_0_0"] == [(None, True, "uncertain_counts_as_correct"), ("no", False, "rule")]
    assert official["VS_chart_1_1_0"] == [(None, False, "rule")]  # VS with a figure: uncertain is wrong
    assert official["VD_illusion_0_0_0"] == [(None, False, "rule")]
    strict = score(bench_root, "hallusionbench", responses, mode="strict")
    assert strict["VS_chart_1_0_0"] == [(None, False, "rule"), ("no", False, "rule")]


def test_ocrbench_points_and_avg_at_k():
    rows = [{"meta": {}, "correct": c} for c in ([True, False], [True, True], [False, False], [False, True])]
    result = benchmarks.get("ocrbench").aggregate(rows, num_samples=2)
    assert result["points"] == pytest.approx(2.0) and result["score"] == pytest.approx(50.0)


# ---- judge ---------------------------------------------------------------------------

class _FakeResponse:
    def __init__(self, payload):
        self.payload = payload

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False

    def read(self):
        return json.dumps(self.payload).encode()


def test_judge_request_and_reply_parsing():
    sent = []

    def opener(request, timeout):
        sent.append((request.full_url, json.loads(request.data), timeout))
        return _FakeResponse({"choices": [{"message": {"content": replies.pop(0)}}]})

    replies = ["B", "NONE", "Z", "12.5"]
    judge = judge_lib.OpenAICompatibleJudge("http://judge.local/v1", "judge-model", opener=opener, timeout_s=3)
    assert judge.extract_choice("q", "long reply", ["x", "y", "z"]) == "B"
    assert judge.extract_choice("q", "long reply", ["x", "y", "z"]) is None
    assert judge.extract_choice("q", "long reply", ["x", "y", "z"]) is None  # out of range
    assert judge.extract_answer("q", "reply") == "12.5"
    url, body, timeout = sent[0]
    assert url == "http://judge.local/v1/chat/completions" and timeout == 3
    assert body["model"] == "judge-model" and body["temperature"] == 0.0


def test_judge_failure_counts_and_falls_back(bench_root):
    import urllib.error

    def opener(request, timeout):
        raise urllib.error.URLError("connection refused")

    judge = judge_lib.OpenAICompatibleJudge("http://judge.local/v1", "m", opener=opener)
    out = score_with_judge(bench_root, judge)
    assert out == [(None, False, "judge"), ("D", True, "rule")]
    assert judge.calls == 1 and judge.failures == 1
    with pytest.raises(ValueError, match="judge.url must start with http"):
        judge_lib.OpenAICompatibleJudge("judge.local", "m")
    assert judge_lib.make_judge("", "m") is None


def score_with_judge(bench_root, judge):
    record = read(bench_root, "mmstar").records[0]  # gold D
    out = benchmarks.get("mmstar").score([record], [["I think it could be several", "D"]], judge=judge)
    return [tuple(x) for x in out[0]]


def test_mathverse_reports_per_version_accuracy():
    rows = [{"meta": {"problem_version": "Vision Only"}, "correct": [True, False]},
            {"meta": {"problem_version": "Text Dominant"}, "correct": [True, True]}]
    result = benchmarks.get("mathverse").aggregate(rows, num_samples=2)
    assert result["score"] == pytest.approx(75.0)
    assert result["versions"] == {"Text Dominant": pytest.approx(100.0), "Vision Only": pytest.approx(50.0)}
