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


def _ridge_accuracy(features, labels, classes, lam=1e-2):
    y = np.array([classes.index(a) for a in labels])
    targets = np.eye(len(classes))[y]
    n_train = int(0.75 * len(features))
    x = np.c_[features, np.ones(len(features))]
    weights = np.linalg.solve(x[:n_train].T @ x[:n_train] + lam * np.eye(x.shape[1]), x[:n_train].T @ targets[:n_train])
    return float((np.argmax(x[n_train:] @ weights, axis=1) == y[n_train:]).mean())


def test_pixelation_destroys_fine_cue_but_keeps_coarse_ones():
    scenes = [S.sample_scene(np.random.default_rng([11, i]), 64) for i in range(800)]
    images = [S.render_scene(s) for s in scenes]
    # The pixelated image is exactly the low-res image blown up (no extra information).
    pix = P.pixelate(images[0])
    np.testing.assert_array_equal(
        np.asarray(pix), np.asarray(images[0].resize((6, 6), Image.BILINEAR).resize((64, 64), Image.NEAREST))
    )
    features = np.stack([_low_res(im) for im in images])
    acc = {
        task: _ridge_accuracy(features, [S.answer_for(s, task) for s in scenes], list(S.ANSWER_VOCAB[task]))
        for task in ("digit", "background", "side")
    }
    assert acc["background"] >= 0.95 and acc["side"] >= 0.95, acc
    assert acc["digit"] <= 0.25, acc  # chance is 0.10

    # Counterfactual: changing only the digit changes the pixelated image by a few grey levels at most
    # (mean over pixels), while changing a coarse attribute changes it a lot.
    def mean_pix_diff(a, b):
        return float(np.abs(np.asarray(P.pixelate(S.render_scene(a)), np.float32)
                            - np.asarray(P.pixelate(S.render_scene(b)), np.float32)).mean())

    fine_diffs, coarse_diffs = [], []
    for s in scenes[:50]:
        other_digit = S.DIGITS[(S.DIGITS.index(s.digit) + 1) % 10]
        fine_diffs.append(mean_pix_diff(s, dataclasses.replace(s, digit=other_digit)))
        other_bg = list(S.BACKGROUNDS)[(list(S.BACKGROUNDS).index(s.background) + 1) % 4]
        coarse_diffs.append(mean_pix_diff(s, dataclasses.replace(s, background=other_bg)))
    assert np.mean(fine_diffs) < 0.5 and np.mean(coarse_diffs) > 20, (np.mean(fine_diffs), np.mean(coarse_diffs))


def test_fine_cue_is_readable_in_the_original():
    # A template reader that knows where the glyph is reads every digit from the original image.
    for i in range(60):
        scene = S.sample_scene(np.random.default_rng([12, i]), 64)
        array = np.asarray(S.render_scene(scene), np.float32).mean(axis=2)
        gx, gy = scene.digit_origin
        k = scene.digit_scale
        crop = array[gy : gy + 5 * k : k, gx : gx + 3 * k : k]
        ink = crop < crop.max() - 1.0
        if not ink.any() or ink.all():
            ink = crop < crop.mean()
        read = [d for d, glyph in S.GLYPHS.items() if np.array_equal(glyph, ink)]
        assert read == [scene.digit]
