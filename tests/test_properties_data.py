"""Properties of the image processor (data/processor.py), the record sources (data/sources.py) and the
pipeline's per-record map (data/pipeline.py Featurize), by hypothesis.

- every Pillow mode, sizes from 1 px to millions of pixels and aspect ratios up to 1:5000 give two views of
  finite values in [-1, 1] on one grid, or a ValueError that names the problem; never anything else;
- the pixelated view keeps the size and the mode, and ratio 1 leaves an image as it is; a ratio outside
  (0, 1] is refused naming it;
- images deeper than 8 bits keep their contrast (Pillow's convert would clip them at 255);
- any record, however malformed (missing or odd-typed fields, unicode and surrogates, garbage or truncated
  bytes, missing files, decompression bombs, unreadable parquet rows), featurizes into a consistent example
  or a skip with one of the pipeline's SKIP_REASONS; nothing raises.
Example counts: tests/hypothesis_profiles.py (`cases`).
"""

import io
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from hypothesis_profiles import cases
from vaopd_jax.data import fixtures, pipeline, processor, sources

MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
         "I;16", "I;16B", "I;16L", "I;16N")
BOUNDS = [(1024, 4096), (4096, 65536), (262144, 1048576)]  # (min_pixels, max_pixels); the last is the paper's min


@st.composite
def images(draw, max_side=3000, max_area=4_000_000):
    """A PIL image of any mode with random content; sides 1..max_side px (long thin strips included)."""
    mode = draw(st.sampled_from(MODES))
    width = draw(st.one_of(st.integers(1, 64), st.integers(1, max_side)))
    height = draw(st.one_of(st.integers(1, 64), st.integers(1, max(1, min(max_side, max_area // width)))))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if mode.startswith("I;16"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).convert(mode)
    elif mode == "I":
        image = Image.fromarray(rng.integers(-2 ** 20, 2 ** 20, (height, width), dtype=np.int32))
    elif mode == "F":
        values = draw(st.sampled_from([1.0, 255.0, 1e30]))
        image = Image.fromarray((rng.standard_normal((height, width)) * values).astype(np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    return image


@cases(40)
@given(image=images(), bounds=st.sampled_from(BOUNDS), image_path=st.sampled_from(processor.IMAGE_PATHS),
       ratio=st.floats(0.01, 1.0))
def test_every_mode_and_size_gives_two_finite_views_on_one_grid_or_a_clear_error(image, bounds, image_path, ratio):
    min_pixels, max_pixels = bounds
    try:
        rows, rows_pix, grid = processor.preprocess_views(image, ratio, min_pixels, max_pixels, image_path)
    except ValueError as err:
        # The only refusals: a shape the Qwen processor cannot patchify (aspect ratio > 200 once bounded), or
        # one Pillow cannot resize into the bounds (a side rounded down to 0 px).
        assert "aspect ratio must be <= 200" in str(err) or "height and width must be > 0" in str(err), err
        assert max(image.size) / min(image.size) > 200 / 2  # only long strips are refused
        return
    t, h, w = (int(v) for v in grid)
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and h >= 2 and w >= 2
    assert rows.shape == rows_pix.shape == (h * w, processor.PATCH_DIM)
    for values in (rows, rows_pix):
        assert values.dtype == np.float32 and np.isfinite(values).all()
        assert values.min() >= -1.0 and values.max() <= 1.0
    assert processor.num_image_tokens(grid) * 4 == h * w


@cases(40)
@given(image=images(max_side=400, max_area=60_000), ratio=st.floats(0.001, 1.0))
def test_pixelate_keeps_size_and_mode_and_ratio_one_is_the_identity(image, ratio):
    out = processor.pixelate(image, ratio)
    assert out.size == image.size and out.mode == image.mode
    if image.mode not in ("P", "1"):  # palette and 1-bit go through RGB / L and back (release rule)
        identity = processor.pixelate(image, 1.0)
        np.testing.assert_array_equal(np.asarray(identity), np.asarray(image))


@cases(20)
@given(shape=st.sampled_from([(7, 5), (7, 5, 1), (7, 5, 3), (7, 5, 4), (1, 1, 3)]), ratio=st.floats(0.01, 1.0),
       seed=st.integers(0, 1000))
def test_pixelate_of_an_array_returns_the_same_shape_and_dtype(shape, ratio, seed):
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    out = processor.pixelate(array, ratio)
    assert out.shape == array.shape and out.dtype == np.uint8


@cases(30)
@given(ratio=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, True, "0.1", None]),
                       st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True)))
def test_bad_pixelation_ratio_is_refused_naming_it(ratio):
    with pytest.raises(ValueError, match=r"pixelation ratio must be a finite number in \(0, 1\]"):
        processor.pixelate(Image.new("RGB", (8, 8)), ratio)
    with pytest.raises(ValueError, match=r"PipelineConfig.pixelation_ratio must be a finite number in \(0, 1\]"):
        pipeline.PipelineConfig(pixelation_ratio=ratio).validate()


@cases(30)
@given(image=images(max_side=2000, max_area=1_000_000), bounds=st.sampled_from(BOUNDS))
def test_bound_pixels_gives_rgb_within_the_pixel_bounds(image, bounds):
    min_pixels, max_pixels = bounds
    try:
        out = processor.bound_pixels(image, min_pixels, max_pixels)
    except ValueError as err:  # a side rounded to 0: aspect ratios of thousands to one
        assert "height and width must be > 0" in str(err)
        return
    assert out.mode == "RGB"
    area = image.width * image.height
    if area > max_pixels:
        assert out.width * out.height <= max_pixels
    elif area >= min_pixels:
        assert out.size == image.size
    if area < min_pixels:
        # int() truncation may leave it just under min_pixels (the release's rule): by less than one row/column
        assert out.width * out.height >= min_pixels - out.width - out.height - 1


@cases(30)
@given(level=st.integers(0, 65535), mode=st.sampled_from(["I;16", "I"]))
def test_high_bit_depth_greyscale_keeps_its_contrast(level, mode):
    image = Image.fromarray(np.full((40, 48), level, np.uint16)).convert(mode)
    grey = np.asarray(processor.bound_pixels(image, 1024, 4096))
    expected = level * 255 / 65535 if (mode == "I;16" or level > 255) else level
    assert abs(int(grey[0, 0, 0]) - expected) <= 1
    assert processor.image_notes(image) == ("high_bit_depth",)


# ----------------------------------------------------------------------------- records
@pytest.fixture(scope="module")
def featurize():
    from vaopd_jax.data.tokenizer import load_tokenizer

    config = pipeline.PipelineConfig(batch_size=2, min_pixels=1024, max_pixels=4096, prompt_buckets=(64, 256))
    return pipeline.Featurize(config, tokenizer=load_tokenizer(None))


def _png(mode="RGB", size=(40, 30)):
    return fixtures.encode_image(fixtures.line_drawing(*size).convert(mode))


GOOD_PNG = _png()
IMAGE_ENTRIES = st.one_of(
    st.sampled_from([GOOD_PNG, _png("L"), _png("P", (33, 50)), _png("RGBA", (64, 64)), b"", b"\x89PNG garbage",
                     GOOD_PNG[: len(GOOD_PNG) // 2], fixtures.bomb_png(), fixtures.bomb_png(20_000, 10_000),
                     {"bytes": GOOD_PNG, "path": None}, {"bytes": None, "path": None},
                     {"bytes": None, "path": "/nonexistent/x.png"}, "/nonexistent/y.jpg", "relative/z.png", None,
                     7, 3.5, ["nested"], Image.new("CMYK", (30, 20)), Image.new("I;16", (2, 900)),
                     Image.new("1", (1, 1)), fixtures.fault_image("animated", 30, 20, 0)["bytes"],
                     fixtures.fault_image("high_bit_depth", 30, 20, 0)["bytes"]]),
    st.binary(max_size=64))
TEXT = st.one_of(st.text(max_size=40), st.text(st.characters(codec=None, categories=None), max_size=20),
                 st.sampled_from(["", "   ", "<image>", "<image><image>", "\ud800", "<|image_pad|>x",
                                  "<image>" + "long " * 400, "答案是 \\boxed{3}", "\x00\n\t"]))


@st.composite
def records(draw):
    record = {}
    for field, values in (("id", st.one_of(st.text(max_size=8), st.integers(), st.none())),
                          ("question", st.one_of(TEXT.map(lambda q: "<image>" + q), TEXT, st.none(), st.integers())),
                          ("answer", st.one_of(TEXT, st.none(), st.integers(), st.floats())),
                          ("images", st.one_of(st.lists(IMAGE_ENTRIES, max_size=3), IMAGE_ENTRIES)),
                          ("kind", st.one_of(st.text(max_size=5), st.none()))):
        if draw(st.integers(0, 9)):  # each field absent one time in ten
            record[field] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        record[sources.UNREADABLE] = draw(st.sampled_from(["f.parquet row group 3: OSError: corrupt", ""]))
    return record


@cases(150)
@given(record=st.one_of(records(), st.sampled_from([None, [], "a string", 5])))
def test_any_record_featurizes_consistently_or_is_skipped_with_a_known_reason(featurize, record):
    out = featurize(record)
    if "skip" in out:
        assert out["skip"] in pipeline.SKIP_REASONS and isinstance(out["detail"], str) and isinstance(out["id"], str)
        return
    grids = out["image_grid_thw"]
    patches = int(np.prod(grids, axis=1).sum())
    assert out["pixel_values"].shape == out["pixel_values_pixelated"].shape == (patches, processor.PATCH_DIM)
    assert np.isfinite(out["pixel_values"]).all() and np.isfinite(out["pixel_values_pixelated"]).all()
    assert len(out["input_ids"]) == len(out["mm_token_type_ids"]) <= 256
    assert int((out["mm_token_type_ids"] == processor.TOKEN_TYPE_IMAGE).sum()) == patches // 4
    assert isinstance(out["answer"], str) and out["answer"].strip()
    assert set(out["notes"]) <= set(pipeline.CONVERSIONS)


def test_a_corrupt_parquet_row_group_costs_only_its_rows(tmp_path, featurize):
    faults = {2: "corrupt_row_group", 7: "undecodable"}
    written = fixtures.write_geometry3k_with_faults(tmp_path, faults, num_rows=9, row_group_size=2)
    source = sources.Geometry3KSource(tmp_path)
    assert len(source) == 9
    reasons = [featurize(source[i]).get("skip") for i in range(9)]
    assert reasons == [None, None, "unreadable_row", "unreadable_row", None, None, None, "undecodable_image", None]
    assert "row group 1" in featurize(source[3])["detail"]
    assert written["counts"] == {"data/skipped/unreadable_row": 2, "data/skipped/undecodable_image": 1}
    assert written["kept_ids"] == [f"g3k-train-{i}" for i in (0, 1, 4, 5, 6, 8)]


@cases(40)
@given(inner=st.text(st.characters(codec=None, categories=None), max_size=20), wrap=st.booleans())
def test_strip_boxed_never_raises_and_unwraps_only_a_whole_balanced_box(inner, wrap):
    text = f"\\boxed{{{inner}}}" if wrap else inner
    out = sources.strip_boxed(text)
    assert isinstance(out, str)
    balanced = all(inner[:i].count("{") >= inner[:i].count("}") for i in range(len(inner) + 1)) and \
        inner.count("{") == inner.count("}")
    if wrap and balanced:
        assert out == inner.strip()
    elif not wrap and not inner.strip().startswith("\\boxed"):
        assert out == inner
    assert sources.strip_boxed(None) is None


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(sources.ImageTooLargeError, match="MAX_IMAGE_PIXELS|exceeds limit"):
        sources.load_image(fixtures.bomb_png())
    with pytest.raises(sources.ImageTooLargeError, match=r"20000 x 10000 = 200,000,000 pixels|exceeds limit"):
        sources.load_image(io.BytesIO(fixtures.bomb_png(20_000, 10_000)).getvalue())
    animated = sources.load_image(fixtures.fault_image("animated", 30, 20, 0)["bytes"])
    assert processor.image_notes(animated) == ("animated",)
