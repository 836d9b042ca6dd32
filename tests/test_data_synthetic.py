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
