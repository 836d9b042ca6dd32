"""Processor parity with transformers' Qwen2VLImageProcessorPil, pixelate, and the chat prompt."""

import math

import numpy as np
import pytest
from PIL import Image

from tests.release_reference import mode_image, release_pixelate, release_views
from vaopd_jax.data import processor as P
from vaopd_jax.data.tokenizer import load_tokenizer


def _reference(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen3-VL preprocessor settings (transformers' Qwen3-VL): patch 16, merge 2, temporal 2, mean = std = 0.5.
    return Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        min_pixels=min_pixels, max_pixels=max_pixels,
    )


def _random_image(height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


# (height, width, mode, min_pixels, max_pixels): typical, extreme aspect ratios both ways, tiny
# (upscaled to min_pixels), above max_pixels (downscaled), non-RGB modes, and demo-sized bounds.
CASES = [
    (300, 200, "RGB", P.MIN_PIXELS, P.MAX_PIXELS),
    (40, 3000, "RGB", P.MIN_PIXELS, P.MAX_PIXELS),
    (2900, 30, "RGB", P.MIN_PIXELS, P.MAX_PIXELS),
    (7, 5, "RGB", P.MIN_PIXELS, P.MAX_PIXELS),
    (600, 800, "RGB", 32 * 32, 256 * 256),  # above max_pixels: downscaled
    (120, 90, "RGBA", P.MIN_PIXELS, P.MAX_PIXELS),
    (77, 133, "L", P.MIN_PIXELS, P.MAX_PIXELS),
    (64, 64, "RGB", 32 * 32, 128 * 128),
    (500, 70, "RGB", 32 * 32, 128 * 128),
]


@pytest.mark.parametrize("height,width,mode,min_pixels,max_pixels", CASES)
def test_preprocess_matches_transformers_pil_processor(height, width, mode, min_pixels, max_pixels):
    image = _random_image(height, width, mode, seed=height * 7 + width)
    ref = _reference(min_pixels, max_pixels)(images=[image], return_tensors="np")
    rows, grid = P.preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)
    assert rows.dtype == np.float32 and rows.shape[1] == 1536
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert rows.shape == ref["pixel_values"].shape
    assert float(np.abs(rows - ref["pixel_values"]).max()) <= 1e-5
    assert rows.shape[0] == int(np.prod(grid))
    t, h, w = grid
    area = h * w * 256
    assert area <= max_pixels or (h == 2 or w == 2)  # floor to one factor only for extreme ratios
    assert h % 2 == 0 and w % 2 == 0


def test_preprocess_accepts_uint8_arrays_and_several_images():
    image = _random_image(90, 150)
    rows_pil, grid_pil = P.preprocess_image(image, 32 * 32, 128 * 128)
    rows_np, grid_np = P.preprocess_image(np.asarray(image), 32 * 32, 128 * 128)
    np.testing.assert_array_equal(rows_pil, rows_np)
    np.testing.assert_array_equal(grid_pil, grid_np)
    rows, grids = P.preprocess_images([image, _random_image(40, 40, seed=3)], 32 * 32, 128 * 128)
    assert grids.shape == (2, 3) and rows.shape[0] == int(np.prod(grids, axis=1).sum())
    np.testing.assert_array_equal(rows[: rows_pil.shape[0]], rows_pil)


def test_smart_resize_rules_and_errors():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_smart_resize

    for h, w in [(1, 150), (33, 33), (1000, 1000), (4000, 3000), (17, 3000)]:
        assert P.smart_resize(h, w) == ref_smart_resize(h, w, 32, P.MIN_PIXELS, P.MAX_PIXELS)
    assert P.smart_resize(64, 64, min_pixels=32 * 32, max_pixels=128 * 128) == (64, 64)
    with pytest.raises(ValueError, match="aspect ratio"):
        P.smart_resize(1, 300)
    with pytest.raises(ValueError, match="min_pixels"):
        P.smart_resize(64, 64, min_pixels=100, max_pixels=10)
    assert P.num_image_tokens((1, 32, 20)) == 160


def _pillow_pixelate(image, ratio):
    w, h = image.size
    small = (max(1, math.floor(ratio * w)), max(1, math.floor(ratio * h)))
    return image.resize(small, Image.BILINEAR).resize((w, h), Image.NEAREST)


@pytest.mark.parametrize("height,width,mode", [(300, 200, "RGB"), (64, 64, "RGBA"), (9, 130, "L"), (5, 5, "RGB")])
def test_pixelate_equals_pillow_reference_and_keeps_grid(height, width, mode):
    image = _random_image(height, width, mode, seed=height + width)
    out = P.pixelate(image, ratio=0.1)
    ref = _pillow_pixelate(image, 0.1)
    assert out.size == image.size and out.mode == image.mode
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    _, grid = P.preprocess_image(image)
    _, grid_pix = P.preprocess_image(out)
    np.testing.assert_array_equal(grid, grid_pix)
    if min(height, width) >= 20:  # really coarser: far fewer distinct colours than the noise input
        assert len(np.unique(np.asarray(out).reshape(-1, len(out.getbands())), axis=0)) <= (
            max(1, int(0.1 * height)) * max(1, int(0.1 * width))
        )


@pytest.mark.parametrize("mode", ["P", "P+transparency", "1", "RGB", "RGBA", "L"])
def test_pixelate_matches_the_release_and_restores_the_mode(mode):
    image = mode_image(50, 70, mode, seed=3)
    before = image.tobytes()
    out = P.pixelate(image, 0.1)
    ref = release_pixelate(image, 0.1)
    assert out.mode == image.mode == ref.mode and out.size == image.size
    assert out.tobytes() == ref.tobytes()
    if image.mode == "P":  # re-quantised: same palette as the release's convert("P")
        assert out.getpalette() == ref.getpalette()
    assert image.tobytes() == before  # the input is not mutated


def test_pixelate_arrays_and_the_releases_ratio_errors():
    rgb = _random_image(50, 70)
    array = np.asarray(rgb)
    out = P.pixelate(array, ratio=0.25)
    assert isinstance(out, np.ndarray) and out.shape == array.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(_pillow_pixelate(rgb, 0.25)))
    assert P.pixelate(rgb, ratio=1).tobytes() == rgb.tobytes()  # int 1 is a valid ratio
    assert P.pixelate(rgb, ratio=np.float32(0.1)).tobytes() == P.pixelate(rgb, 0.1).tobytes()
    for bad in (0, 0.0, -0.1, 1.1, True, False, "0.1", None, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ratio"):
            P.pixelate(rgb, ratio=bad)


VIEW_MODES = ["RGB", "RGBA", "L", "P", "P+transparency", "1"]
# (height, width, min_pixels, max_pixels): below, inside and above the bounds (small bounds keep it fast)
VIEW_SIZES = [(25, 37, 4096, 16384), (70, 90, 4096, 16384), (151, 209, 4096, 16384)]  # int() != round() in both resizes


def test_release_views_geometry3k_sized_diagram_at_paper_bounds():
    """300x200 (below 262,144 pixels): 62x41 pixelation cells and a 640x416 grid (single resize: 30x20, 640x448)."""
    image = _random_image(200, 300)
    original, pixelated = P.image_views(image, 0.1, P.MIN_PIXELS, P.MAX_PIXELS)
    assert original.size == (627, 418)  # int(300 * f) x int(200 * f), f = sqrt(262144 / 60000)
    ref_original, ref_pixelated = release_views(image, 0.1, P.MIN_PIXELS, P.MAX_PIXELS)
    assert original.tobytes() == ref_original.tobytes() and pixelated.tobytes() == ref_pixelated.tobytes()
    cells = np.asarray(pixelated)
    assert len(np.unique(cells[0], axis=0)) <= 62 and len(np.unique(cells[:, 0], axis=0)) <= 41
    _, _, grid = P.preprocess_views(image, 0.1)
    np.testing.assert_array_equal(grid, [1, 416 // 16, 640 // 16])
    _, _, grid_single = P.preprocess_views(image, 0.1, image_path="single_resize")
    np.testing.assert_array_equal(grid_single, [1, 448 // 16, 640 // 16])


@pytest.mark.parametrize("height,width,min_pixels,max_pixels", VIEW_SIZES)
@pytest.mark.parametrize("mode", VIEW_MODES)
def test_release_views_equal_the_processors_pixel_for_pixel(height, width, min_pixels, max_pixels, mode):
    image = mode_image(height, width, mode, seed=height + width)
    ref_original, ref_pixelated = release_views(image, 0.1, min_pixels, max_pixels)
    original, pixelated = P.image_views(image, 0.1, min_pixels, max_pixels)
    assert original.mode == pixelated.mode == "RGB" and original.size == pixelated.size == ref_original.size
    assert original.tobytes() == ref_original.tobytes()
    assert pixelated.tobytes() == ref_pixelated.tobytes()
    rows, rows_pix, grid = P.preprocess_views(image, 0.1, min_pixels, max_pixels)
    reference = _reference(min_pixels, max_pixels)
    for view, got in ((ref_original, rows), (ref_pixelated, rows_pix)):
        ref = reference(images=[view], return_tensors="np")
        np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
        assert got.shape == ref["pixel_values"].shape
        assert float(np.abs(got - ref["pixel_values"]).max()) <= 1e-5


def test_single_resize_path_is_the_older_one():
    image = mode_image(40, 60, "RGBA", seed=1)
    original, pixelated = P.image_views(image, 0.1, 4096, 16384, image_path="single_resize")
    assert original is image and pixelated.mode == "RGBA"
    assert pixelated.tobytes() == _pillow_pixelate(image, 0.1).tobytes()
    palette = mode_image(40, 60, "P", seed=1)
    _, pixelated = P.image_views(palette, 0.1, 4096, 16384, image_path="single_resize")
    assert pixelated.mode == "RGB"  # palette interpolated in RGB and left there, as before
    assert P.model_image(image, 4096, 16384, "single_resize") is image
    with pytest.raises(ValueError, match="image_path"):
        P.image_views(image, 0.1, image_path="twice")


def test_split_question_placeholders():
    assert P.split_question("<image>Find x.", 1) == [{"type": "image"}, {"type": "text", "text": "Find x."}]
    assert P.split_question("Find x.", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Find x."}]
    assert P.split_question("A <image> and B <image>", 2) == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " and B "}, {"type": "image"},
    ]
    with pytest.raises(ValueError, match="2 '<image>' placeholders but the record has 1"):
        P.split_question("<image><image>", 1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _reference_prompt(tok, question, grids):
    """What Qwen3VLProcessor does: template text, each <|image_pad|> -> t*h*w/4 copies, tokenize."""
    text = tok.apply_chat_template(P.build_messages(question, len(grids)), tokenize=False, add_generation_prompt=True)
    pieces = text.split("<|image_pad|>")
    expanded = pieces[0]
    for grid, piece in zip(grids, pieces[1:]):
        expanded += "<|image_pad|>" * (int(np.prod(grid)) // 4) + piece
    return text, tok(expanded, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "question,grids",
    [
        ("<image>Find x. Round to the nearest tenth.", [(1, 4, 6)]),
        ("As shown in the figure, AB = 3 \\sqrt { 2 }, find \\angle ABC.", [(1, 2, 2)]),
        ("<image>图中三角形的面积是多少？", [(1, 8, 4)]),
        ("Compare <image> with <image>: which bar is taller?", [(1, 4, 4), (1, 2, 8)]),
    ],
)
def test_build_prompt_matches_chat_template(tok, question, grids):
    ids, types = P.build_prompt(tok, question, grids)
    text, ref_ids = _reference_prompt(tok, question, grids)
    assert ids.dtype == np.int32 and types.shape == ids.shape
    np.testing.assert_array_equal(ids, np.asarray(ref_ids))
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "system" not in text
    n_image = sum(int(np.prod(g)) // 4 for g in grids)
    assert int((ids == 151655).sum()) == n_image == int(types.sum())
    np.testing.assert_array_equal(types == 1, ids == 151655)
    assert int((ids == 151652).sum()) == len(grids) == int((ids == 151653).sum())
    if "<image>" not in question:  # images first in the user turn
        assert ids[3] == 151652
    assert ids[0] == 151644 and ids[-2] == 77091 and ids[-1] == 198  # "assistant", "\n"
