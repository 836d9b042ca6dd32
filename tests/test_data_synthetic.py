"""Synthetic vision-critical task: determinism, answers, and that 10 % pixelation kills only the fine cue."""

import dataclasses

import numpy as np
from PIL import Image

from vaopd_jax.data import processor as P
from vaopd_jax.data import synthetic as S


def test_records_are_deterministic_and_well_formed():
    source = S.SyntheticSource(num_records=40, seed=3, image_size=64)
    again = S.SyntheticSource(num_records=40, seed=3, image_size=64)
    other = S.SyntheticSource(num_records=40, seed=4, image_size=64)
    kinds = set()
    for i in range(len(source)):
        rec, rec2 = source[i], again[i]
        assert rec["id"] == rec2["id"] == f"synthetic-3-{i}"
        np.testing.assert_array_equal(np.asarray(rec["images"][0]), np.asarray(rec2["images"][0]))
        assert rec["images"][0].size == (64, 64) and rec["images"][0].mode == "RGB"
        assert rec["question"].startswith("<image>")
        assert rec["answer"] in S.ANSWER_VOCAB[rec["task"]]
        assert rec["kind"] == S.KIND_OF_TASK[rec["task"]]
        kinds.add(rec["kind"])
    assert kinds == {"fine", "coarse"}
    differing = sum(not np.array_equal(np.asarray(source[i]["images"][0]), np.asarray(other[i]["images"][0])) for i in range(10))
    assert differing == 10
    import pickle

    assert repr(pickle.loads(pickle.dumps(source))) == repr(source)


def test_answers_are_single_tokens():
    from vaopd_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for task, vocab in S.ANSWER_VOCAB.items():
        for answer in vocab:
            assert len(tok.encode(answer, add_special_tokens=False)) == 1, (task, answer)


def _low_res(image):
    # The pixelated view is a NEAREST upsampling of this bilinear 10 % image: it holds all its information.
    return np.asarray(image.resize((6, 6), Image.BILINEAR), np.float32).ravel() / 255.0


def _fit_ridge(features, labels, classes, lam=1e-2):
    targets = np.eye(len(classes))[[classes.index(a) for a in labels]]
    x = np.c_[features, np.ones(len(features))]
    if x.shape[1] > x.shape[0]:  # wide (full-resolution pixels): the dual form is the same solution
        return x.T @ np.linalg.solve(x @ x.T + lam * np.eye(len(x)), targets)
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ targets)


def _ridge_accuracy(weights, features, labels, classes):
    y = np.array([classes.index(a) for a in labels])
    return float((np.argmax(np.c_[features, np.ones(len(features))] @ weights, axis=1) == y).mean())


def test_pixelation_destroys_fine_cue_but_keeps_coarse_ones():
    scenes = [S.sample_scene(np.random.default_rng([11, i]), 64) for i in range(800)]
    images = [S.render_scene(s) for s in scenes]
    # The pixelated image is exactly the low-res image blown up (no extra information).
    pix = P.pixelate(images[0])
    np.testing.assert_array_equal(
        np.asarray(pix), np.asarray(images[0].resize((6, 6), Image.BILINEAR).resize((64, 64), Image.NEAREST))
    )
    # A reader fitted on the ORIGINAL images (as the teacher is) reads the texture there, and at chance
    # (1/3) from the pixelated views. The colours are still in the pixelated views: a probe fitted on
    # them reads both.
    original = np.stack([np.asarray(im, np.float32).ravel() / 255.0 for im in images])
    pixelated = np.stack([np.asarray(P.pixelate(im), np.float32).ravel() / 255.0 for im in images])
    low_res = np.stack([_low_res(im) for im in images])
    train, test = slice(0, 600), slice(600, None)
    labels = {task: [S.answer_for(s, task) for s in scenes] for task in S.ANSWER_VOCAB}
    classes = {task: list(vocab) for task, vocab in S.ANSWER_VOCAB.items()}
    weights = _fit_ridge(original[train], labels["pattern"][train], classes["pattern"], lam=1.0)
    on_original = _ridge_accuracy(weights, original[test], labels["pattern"][test], classes["pattern"])
    on_pixelated = _ridge_accuracy(weights, pixelated[test], labels["pattern"][test], classes["pattern"])
    assert on_original >= 0.95 and on_pixelated <= 0.45, (on_original, on_pixelated)
    for task in ("background", "disk"):
        weights = _fit_ridge(low_res[train], labels[task][train], classes[task])
        assert _ridge_accuracy(weights, low_res[test], labels[task][test], classes[task]) >= 0.95, task

    # Counterfactual: changing only the texture changes the pixelated image by about half a grey level
    # (mean over pixels) against tens of grey levels in the original; a coarse attribute changes a lot.
    def mean_diff(a, b, view):
        return float(np.abs(np.asarray(view(S.render_scene(a)), np.float32)
                            - np.asarray(view(S.render_scene(b)), np.float32)).mean())

    fine_pix, fine_orig, coarse_pix = [], [], []
    for s in scenes[:50]:
        other = dataclasses.replace(s, pattern=S.PATTERNS[(S.PATTERNS.index(s.pattern) + 1) % len(S.PATTERNS)])
        fine_pix.append(mean_diff(s, other, P.pixelate))
        fine_orig.append(mean_diff(s, other, lambda im: im))
        other_bg = list(S.BACKGROUNDS)[(list(S.BACKGROUNDS).index(s.background) + 1) % 4]
        coarse_pix.append(mean_diff(s, dataclasses.replace(s, background=other_bg), P.pixelate))
    assert np.mean(fine_pix) < 1.0 and np.mean(fine_orig) > 20 and np.mean(coarse_pix) > 20, (
        np.mean(fine_pix), np.mean(fine_orig), np.mean(coarse_pix))


def test_fine_cue_is_readable_in_the_original():
    # Away from the disk, the ink layout of every 2x2 block tells the texture exactly.
    for i in range(60):
        scene = S.sample_scene(np.random.default_rng([12, i]), 64)
        array = np.asarray(S.render_scene(scene), np.float32).mean(axis=2)
        cx, cy = scene.disk_center
        y, x = (2, 2) if np.hypot(cx - 3, cy - 3) > scene.disk_radius + 3 else (58, 58)
        if np.hypot(cx - x - 1, cy - y - 1) <= scene.disk_radius + 3:
            y, x = 2, 58
        block = array[y:y + 2, x:x + 2]
        ink = block < block.max() - 1.0
        read = [p for p in S.PATTERNS if np.array_equal(S.pattern_mask(p, 64, 64)[y:y + 2, x:x + 2], ink)]
        assert read == [scene.pattern]


def _tokenizer():
    from vaopd_jax.data.tokenizer import load_tokenizer

    return load_tokenizer()


def test_replies_are_deterministic_varied_and_in_length():
    tok = _tokenizer()
    source = S.SyntheticSource(num_records=300, seed=5, image_size=64)
    lengths, openings, by_task = [], set(), {}
    for i in range(len(source)):
        rec = source[i]
        assert rec["reply"] == S.SyntheticSource(num_records=300, seed=5)[i]["reply"]  # deterministic
        info = S.reply_token_info(tok, rec["reply"], rec["task"])
        lengths.append(len(info["ids"]))
        openings.add(rec["reply"].split(".")[0])
        words = {"disk": rec["scene"].disk, "background": rec["scene"].background}
        by_task.setdefault(rec["task"], set()).update(
            j for j, d in enumerate(S.DESCRIBE) if d.format(**words) in rec["reply"])
        assert rec["reply"].endswith(f"Answer: {rec['answer']}")
        assert info["ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
        # the final answer is one token, right before <|im_end|>; grading finds it as the earliest answer
        assert info["answer"] == [len(info["ids"]) - 2]
        assert tok.decode(info["ids"][info["answer"][0]]).strip() == rec["answer"]
        assert "answer" not in rec["reply"][:rec["reply"].rfind("Answer:")].lower()
    low, high = S.REPLY_TOKENS
    assert low <= min(lengths) and max(lengths) <= high, (min(lengths), max(lengths))
    assert 30 <= np.mean(lengths) <= 45
    # varied phrasing: every restatement and every description is used
    assert len(openings) == sum(len(v) for v in S.RESTATE.values())
    assert all(len(v) == len(S.DESCRIBE) for v in by_task.values())
    assert S.SyntheticSource(10, seed=6)[0]["reply"] != source[0]["reply"]


def test_critical_tokens_are_exactly_the_ones_the_fine_detail_changes():
    tok = _tokenizer()
    seen_fine = 0
    for i in range(120):
        rng = np.random.default_rng([21, i])
        scene = S.sample_scene(rng, 64)
        for task in S.QUESTIONS:
            # the same phrasing (same rng state) with each of the three textures
            infos = [S.reply_token_info(tok, S.make_reply(dataclasses.replace(scene, pattern=p), task,
                                                         np.random.default_rng([22, i])), task)
                     for p in S.PATTERNS]
            ids = np.array([info["ids"] for info in infos])  # same length: every texture word is one token
            changed = np.nonzero((ids != ids[0]).any(0))[0].tolist()
            info = infos[0]
            if task == "pattern":
                seen_fine += 1
                # two tokens in the reasoning (the detail seen up close, the texture concluded) + the answer
                assert len(info["critical"]) == 2 and changed == info["critical"] + info["answer"]
                words = [tok.decode([info["ids"][j]]).strip() for j in info["critical"]]
                assert words == [S.DETAIL_WORDS[S.PATTERNS[0]], S.PATTERNS[0]]
                assert info["critical"][0] >= 15  # after the restatement and the description
            else:
                assert info["critical"] == [] and changed == []  # coarse replies do not depend on the texture
    assert seen_fine == 120


def test_reply_errors_are_clear():
    tok = _tokenizer()
    scene = S.sample_scene(np.random.default_rng(0), 64)
    import pytest

    with pytest.raises(ValueError, match="unknown synthetic task"):
        S.make_reply(scene, "size", np.random.default_rng(0))
    with pytest.raises(ValueError, match="no final 'Answer"):
        S.reply_token_info(tok, "The texture is grid.", "pattern")
    with pytest.raises(ValueError, match="exactly one of"):
        S.reply_token_info(tok, "Lines form rows and columns, so grid. Answer: grid", "pattern")


def test_auxiliary_question_asks_the_texture_in_other_words():
    source = S.SyntheticSource(300, seed=7, fine_fraction=0.3, aux_fraction=0.4)
    tasks = [source[i]["task"] for i in range(len(source))]
    assert 0.3 <= tasks.count(S.AUX_TASK) / len(tasks) <= 0.5 and 0.2 <= tasks.count("pattern") / len(tasks) <= 0.4
    for i in range(len(source)):
        rec = source[i]
        if rec["task"] == S.AUX_TASK:
            assert rec["kind"] == "aux" and rec["question"] == S.AUX_QUESTION
            assert rec["answer"] == S.AUX_WORDS[rec["scene"].pattern]
            assert rec["reply"] in {f"{r.format(aux=rec['answer'])} Answer: {rec['answer']}" for r in S.AUX_REASON}
            # never the fine question's words: what the student learns here does not name the texture
            assert not set(rec["reply"].replace(".", "").split()) & {*S.DETAIL_WORDS.values(), *S.PATTERNS}
    # without the auxiliary share, the record stream is the one it always was
    plain, zero = S.SyntheticSource(50, seed=7), S.SyntheticSource(50, seed=7, aux_fraction=0.0)
    assert all(plain[i]["reply"] == zero[i]["reply"] and plain[i]["task"] != S.AUX_TASK for i in range(50))
    import pytest

    with pytest.raises(ValueError, match="aux_fraction must be in"):
        S.SyntheticSource(10, fine_fraction=0.8, aux_fraction=0.3)


def test_scaffold_replies_have_the_asked_length_and_one_detail_token():
    tok = _tokenizer()
    for n in (0, 4, 16, 48):
        source = S.SyntheticSource(60, seed=2, replies=S.Replies("scaffold", n))
        for i in range(len(source)):
            rec = source[i]
            info = S.reply_token_info(tok, rec["reply"], rec["task"])
            # filler + "A <disk> disk on <background>." + "The lines form <detail>. Answer: <texture>" + <|im_end|>
            fine = rec["task"] == "pattern"
            assert len(info["ids"]) == n + (15 if fine else 10) and info["answer"] == [len(info["ids"]) - 2]
            assert tok.decode(info["ids"][n + 1]).strip() == rec["scene"].disk
            if fine:
                assert info["critical"] == [n + 9]
                assert tok.decode(info["ids"][n + 9]).strip() == S.DETAIL_WORDS[rec["scene"].pattern]
    # every variant of every slot is SCAFFOLD_UNIT tokens, first in a reply or after a space
    for slot in S.SCAFFOLD_SLOTS:
        for text in slot:
            assert len(tok.encode(text, add_special_tokens=False)) == S.SCAFFOLD_UNIT
            assert len(tok.encode(" " + text, add_special_tokens=False)) == S.SCAFFOLD_UNIT


def test_phrasing_mismatch_splits_the_variants_between_teacher_and_student():
    assert S.mismatched_slots(8, 0.0) == () and S.mismatched_slots(8, 1.0) == tuple(range(8))
    assert S.mismatched_slots(8, 0.5) == (1, 3, 5, 7) and S.mismatched_slots(4, 0.25) == (3,)

    def used(phrasing, mismatch, n=32):
        seen = [set() for _ in range(n // S.SCAFFOLD_UNIT)]
        for i in range(200):
            text = S.scaffold_text(n, np.random.default_rng([3, i]), phrasing, mismatch)
            for slot, sentence in enumerate(s + "." for s in text[:-1].split(". ")):
                seen[slot].add(S.SCAFFOLD_SLOTS[slot].index(sentence))
        return seen

    assert all(v == {0, 1, 2, 3} for v in used("teacher", 0.0))  # no mismatch: both see every phrasing
    teacher, student = used("teacher", 0.5), used("student", 0.5)
    for slot in range(8):
        if slot in S.mismatched_slots(8, 0.5):
            assert teacher[slot] == {0, 1} and student[slot] == {2, 3}
        else:
            assert teacher[slot] == student[slot] == {0, 1, 2, 3}
    assert all(v == {0, 1, 2, 3} for v in used("all", 1.0))  # prompts the trainer samples: every phrasing
    import pytest

    with pytest.raises(ValueError, match="multiple of 4"):
        S.Replies("scaffold", 6)
    with pytest.raises(ValueError, match="phrasing mismatch must be in"):
        S.Replies("scaffold", 8, "teacher", 1.5)


def test_source_from_config_phrases_each_warm_up_as_its_role():
    import os

    from vaopd_jax import config as config_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = config_lib.load_sibling(os.path.join(repo, "configs", "base.py"), "demo").get_config()
    c.workdir = "/tmp/x"
    c.data.synthetic_train_size, c.data.synthetic_fine_fraction, c.data.image_size = 20, 0.75, 64
    c.data.synthetic_reply_style, c.data.synthetic_scaffold_tokens = "scaffold", 8
    c.data.synthetic_phrasing_mismatch, c.eval.num_problems = 1.0, 12
    c.teacher.sft.fine_fraction, c.teacher.sft.aux_fraction = 0.5, 0.0
    c.student.sft.fine_fraction, c.student.sft.aux_fraction = 0.3, 0.3
    config = config_lib.load(c, check_paths=False)
    teacher = S.source_from_config(config, "teacher_sft", seed=1)
    student = S.source_from_config(config, "student_sft", seed=1)
    val = S.source_from_config(config, "val", seed=3)
    assert len(teacher) == 20 and len(val) == 12 and val.fine_fraction == 0.5
    assert teacher.replies == S.Replies("scaffold", 8, "teacher", 1.0) and student.replies.phrasing == "student"
    assert student.aux_fraction == 0.3 and teacher.aux_fraction == 0.0
    first = {S.SCAFFOLD_SLOTS[0].index(r["reply"].split(". ")[0] + ".") for r in (teacher[i] for i in range(20))}
    assert first <= {0, 1}
