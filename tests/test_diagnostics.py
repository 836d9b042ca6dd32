"""Tests for vaopd_jax.notebook.diagnostics on hand-made inputs with known answers."""

import html
import io
import math
import re

import numpy as np
import pytest
from PIL import Image

from vaopd_jax.runtime import metrics as metrics_lib
from vaopd_jax.notebook import diagnostics


# ---------------------------------------------------------------- concentration


def test_single_spike_carries_all_mass():
    va = np.zeros(10)
    va[3] = 1.0
    fractions, share = diagnostics.va_concentration_curve(va)
    np.testing.assert_allclose(fractions, np.arange(11) / 10)
    np.testing.assert_allclose(share, np.r_[0.0, np.ones(10)])
    assert diagnostics.top_fraction_share(va, fraction=0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("num_tokens", [7, 10, 33])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_uniform_share_equals_fraction(num_tokens, fraction):
    va = np.full(num_tokens, 0.3)
    assert diagnostics.top_fraction_share(va, fraction=fraction) == pytest.approx(fraction, abs=1e-12)


def test_curve_sorted_descending_and_normalized():
    va = np.array([0.1, 0.5, 0.0, 0.4])
    fractions, share = diagnostics.va_concentration_curve(va)
    np.testing.assert_allclose(fractions, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(share, [0.0, 0.5, 0.9, 1.0, 1.0])
    # Interpolated between whole tokens: 10 % of 4 tokens = 0.4 of the top token.
    assert diagnostics.top_fraction_share(va, fraction=0.1) == pytest.approx(0.4 * 0.5)


def test_masked_tokens_are_ignored_even_if_garbage():
    va = np.array([[0.2, 0.2, 9.0, np.nan], [0.2, 0.2, -5.0, 0.0]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    # Four valid tokens of equal VA: uniform, whatever sits under the mask.
    assert diagnostics.top_fraction_share(va, mask, fraction=0.5) == pytest.approx(0.5)
    fractions, _ = diagnostics.va_concentration_curve(va, mask)
    assert fractions.shape == (5,)


def test_zero_mass_gives_nan_and_no_valid_token_raises():
    _, share = diagnostics.va_concentration_curve(np.zeros(5))
    assert np.isnan(share).all()
    assert math.isnan(diagnostics.top_fraction_share(np.zeros(5)))
    with pytest.raises(ValueError, match="at least one valid token"):
        diagnostics.va_concentration_curve(np.ones(3), np.zeros(3))


def test_invalid_inputs_raise_actionable_errors():
    with pytest.raises(ValueError, match=r"va must be >= 0.*min -0.5"):
        diagnostics.va_concentration_curve(np.array([0.1, -0.5]))
    with pytest.raises(ValueError, match="non-finite"):
        diagnostics.va_concentration_curve(np.array([0.1, np.inf]))
    with pytest.raises(ValueError, match=r"mask shape \(3,\) must equal va shape \(2,\)"):
        diagnostics.va_concentration_curve(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        diagnostics.top_fraction_share(np.ones(2), fraction=1.5)


def test_accepts_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    va = jnp.array([[1.0, 0.0, 0.0, 0.0, 0.0]], dtype=jnp.bfloat16)
    mask = jnp.array([[True, True, True, True, True]])
    assert diagnostics.top_fraction_share(va, mask, fraction=0.2) == pytest.approx(1.0)


def test_va_summary_numbers():
    va = np.array([[0.0, 0.4, 0.0, 7.0], [0.2, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    summary = diagnostics.va_summary(va, mask)
    # Valid values: 0, 0.4, 0, 0.2, 0 (five tokens).
    assert summary["mean"] == pytest.approx(0.6 / 5)
    assert summary["max"] == pytest.approx(0.4)
    assert summary["nonzero_fraction"] == pytest.approx(2 / 5)
    assert summary["num_tokens"] == 5
    # Top 10 % of 5 tokens = half of the 0.4 token: 0.2 / 0.6.
    assert summary["top10_share"] == pytest.approx(0.2 / 0.6)
    empty = diagnostics.va_summary(np.ones(3), np.zeros(3))
    assert empty["num_tokens"] == 0 and math.isnan(empty["mean"])


# ---------------------------------------------------------------- token views


def test_html_escapes_text_and_shades_by_va():
    tokens = ["<b>", " a & b", '"q"', "pad"]
    va = np.array([1.0, 0.0, 0.5, 0.0])
    mask = np.array([1, 1, 1, 0])
    out = diagnostics.va_token_html(tokens, va, mask, legend=False)
    assert "<b>" not in out.replace('<div class="va-tokens"', "")
    assert "&lt;b&gt;" in out and " a &amp; b" in out and "&quot;q&quot;" in out
    assert "pad" not in out  # masked tokens left out by default
    spans = re.findall(r'<span style="background-color:(#[0-9a-f]{6});color:(#[0-9a-f]{6})" title="VA ([^"]+)">',
                       out)
    assert [float(v) for _, _, v in spans] == [1.0, 0.0, 0.5]
    colors = [tuple(int(bg[i:i + 2], 16) for i in (1, 3, 5)) for bg, _, _ in spans]
    # Higher VA → darker background (Reds colour map, scaled to the max VA).
    assert sum(colors[0]) < sum(colors[2]) < sum(colors[1])
    assert spans[0][1] == "#ffffff" and spans[1][1] == "#000000"  # readable text on dark / light
    shown = diagnostics.va_token_html(tokens, va, mask, show_masked=True, legend=False)
    assert '<span style="color:#999999" title="masked">pad</span>' in shown
    # Unescaping the spans gives back the shown text exactly.
    text = html.unescape(re.sub(r"<[^>]+>", "", out))
    assert text == "<b> a & b\"q\""


def test_html_legend_and_vmax():
    out = diagnostics.va_token_html(["x"], np.array([0.25]), vmax=0.5)
    assert "0 … 0.5" in out
    with pytest.raises(ValueError, match="vmax must be a finite number > 0"):
        diagnostics.va_token_html(["x"], np.array([0.25]), vmax=0.0)


def test_token_view_length_and_shape_errors():
    with pytest.raises(ValueError, match="tokens_text has 2 entries but va has T=3"):
        diagnostics.va_token_html(["a", "b"], np.zeros(3))
    with pytest.raises(ValueError, match=r"va must be \(T,\) for one rollout"):
        diagnostics.va_token_png(["a"], np.zeros((1, 1)))


def test_png_size_follows_documented_layout():
    font_size, width = 16, 400
    pad, line_height = font_size // 2, round(1.5 * font_size)
    tokens = ["a", "\n", "b", "\nc", "\npad"]
    va = np.array([0.9, 0.0, 0.1, 0.3, np.nan])
    mask = np.array([1, 1, 1, 1, 0])
    image = diagnostics.va_token_png(tokens, va, mask, width=width, font_size=font_size)
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size == (width, 2 * pad + 3 * line_height + 2 * line_height)
    no_legend = diagnostics.va_token_png(tokens, va, mask, width=width, font_size=font_size, legend=False)
    assert no_legend.size == (width, 2 * pad + 3 * line_height)
    # The masked token (its VA is garbage) adds its own line only when shown.
    shown = diagnostics.va_token_png(tokens, va, mask, width=width, font_size=font_size, legend=False,
                                     show_masked=True)
    assert shown.size == (width, 2 * pad + 4 * line_height)
    # The first token's box starts at (pad, pad) and has the colour of the max VA.
    expected = diagnostics._token_colors(np.array([0.9]), 0.9)[0]
    assert tuple(no_legend.getpixel((pad, pad))) == tuple(int(c) for c in expected)


def test_png_wraps_long_text_and_saves(tmp_path):
    tokens = ["word "] * 60 + ["x" * 300]
    va = np.linspace(0.0, 1.0, len(tokens))
    image = diagnostics.va_token_png(tokens, va, width=300, font_size=12, legend=False)
    line_height, pad = 18, 6
    n_lines = (image.height - 2 * pad) // line_height
    assert n_lines > 5  # 60 words and a 300-character token cannot fit on a few 300 px lines
    path = diagnostics.va_token_png(tokens, va, path=tmp_path / "t.png", width=300, font_size=12, legend=False)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == image.size


# ---------------------------------------------------------------- images and plots


def test_side_by_side_places_both_pictures():
    original = np.zeros((20, 30, 3), np.uint8)
    original[..., 0] = 200
    pixelated = Image.new("RGB", (30, 20), (0, 0, 180))
    band = round(1.5 * 14)
    out = diagnostics.side_by_side(original, pixelated, gap=5)
    assert out.size == (30 + 5 + 30, 20 + band)
    assert out.getpixel((0, band)) == (200, 0, 0)
    assert out.getpixel((35, band)) == (0, 0, 180)
    assert out.getpixel((32, band + 10)) == (255, 255, 255)  # the gap
    bare = diagnostics.side_by_side(np.full((4, 6), 0.5), np.full((8, 2, 1), 10, np.uint8), labels=None, gap=0)
    assert bare.size == (8, 8)
    assert bare.getpixel((0, 0)) == (128, 128, 128) and bare.getpixel((6, 7)) == (10, 10, 10)
    assert bare.getpixel((0, 6)) == (255, 255, 255)  # padding below the shorter picture
    with pytest.raises(ValueError, match="outside"):
        diagnostics.side_by_side(np.full((2, 2, 3), 3.0), pixelated)
    with pytest.raises(ValueError, match="dtype"):
        diagnostics.side_by_side(np.zeros((2, 2, 3), np.int32), pixelated)


def test_plot_curves_draws_each_series(tmp_path):
    history = {"OPD": [(100, 0.10), (0, 0.07), (50, 0.08)], "VA-OPD": [(0, 0.07), (50, 0.12), (100, 0.16)]}
    image = diagnostics.plot_curves(history, title="mean student VA", figsize=(5, 3), dpi=80)
    assert image.size == (400, 240)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    # matplotlib's default cycle: C0 = #1f77b4, C1 = #ff7f0e; both lines must be on the canvas.
    for color in [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]:
        assert np.sum(np.all(np.abs(pixels - color) <= 2, axis=1)) > 50
    one = np.asarray(diagnostics.plot_curves({"OPD": history["OPD"]}, figsize=(5, 3), dpi=80)).reshape(-1, 3)
    assert np.sum(np.all(np.abs(one.astype(int) - (0xFF, 0x7F, 0x0E)) <= 2, axis=1)) == 0
    path = diagnostics.plot_curves(history, tmp_path / "curves.png", figsize=(5, 3), dpi=80)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (400, 240)
    with pytest.raises(ValueError, match="history is empty"):
        diagnostics.plot_curves({})
    with pytest.raises(ValueError, match=r"history\['OPD'\] has no"):
        diagnostics.plot_curves({"OPD": []})


def test_plot_concentration_size_and_zero_mass():
    va = np.array([1.0, 0.1, 0.0, 0.0])
    image = diagnostics.plot_concentration(va, figsize=(3, 3), dpi=50)
    assert image.size == (150, 150)
    with pytest.raises(ValueError, match="mass is zero"):
        diagnostics.plot_concentration(np.zeros(4))


# ---------------------------------------------------------------- tensorboard


def test_log_va_diagnostics_round_trip(tmp_path):
    from tensorboardX import SummaryWriter

    va = np.zeros((2, 10))
    va[0, 2] = 0.8
    va[1, 5] = 0.2
    mask = np.ones((2, 10))
    mask[1, 8:] = 0
    tokens = [f" t{i}" for i in range(10)]
    image = np.full((16, 24, 3), 90, np.uint8)
    writer = SummaryWriter(str(tmp_path))
    returned = diagnostics.log_va_diagnostics(writer, 7, va, mask, tokens_text=tokens, image=image,
                                              pixelated=image[::-1], rollout_index=1)
    writer.add_scalar("va/mean", 0.5, 8)
    writer.close()

    assert returned["num_tokens"] == 18
    scalars = metrics_lib.read_tensorboard_scalars(tmp_path)
    assert scalars["va/mean"] == [(7, pytest.approx(1.0 / 18)), (8, 0.5)]
    assert scalars["va/max"] == [(7, pytest.approx(0.8))]
    assert scalars["va/nonzero_fraction"] == [(7, pytest.approx(2 / 18))]
    # 10 % of 18 tokens = 1.8 tokens: the 0.8 token and 0.8 of the 0.2 token.
    assert scalars["va/top10_share"] == [(7, pytest.approx((0.8 + 0.8 * 0.2) / 1.0))]

    images, histograms = {}, {}
    for event in metrics_lib.iter_events(tmp_path):
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag] = value.image
            if value.HasField("histo"):
                histograms[value.tag] = value.histo
    assert set(images) == {"va/tokens", "va/concentration", "va/image_vs_pixelated"}
    with Image.open(io.BytesIO(images["va/image_vs_pixelated"].encoded_image_string)) as decoded:
        assert decoded.size == (24 + 8 + 24, 16 + 21)
    expected_tokens = diagnostics.va_token_png(tokens, va[1], mask[1])
    assert (images["va/tokens"].width, images["va/tokens"].height) == expected_tokens.size
    histo = histograms["va/valid_tokens"]
    assert histo.num == 18 and histo.max == pytest.approx(0.8) and histo.sum == pytest.approx(1.0)


def test_log_va_diagnostics_zero_mass_and_argument_errors(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    summary = diagnostics.log_va_diagnostics(writer, 0, np.zeros((1, 4)), np.ones((1, 4)))
    writer.close()
    assert math.isnan(summary["top10_share"])
    scalars = metrics_lib.read_tensorboard_scalars(tmp_path)
    assert "va/top10_share" not in scalars and scalars["va/mean"] == [(0, 0.0)]
    with pytest.raises(ValueError, match="both image and pixelated"):
        diagnostics.log_va_diagnostics(writer, 0, np.zeros(4), image=np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"rollout_index must be in \[0, 1\), got 3"):
        diagnostics.log_va_diagnostics(_NullWriter(), 0, np.ones((1, 2)), tokens_text=["a", "b"], rollout_index=3)


class _NullWriter:
    def add_scalar(self, *args, **kwargs):
        pass

    add_histogram = add_image = add_scalar


def test_event_reader_detects_corruption_and_tolerates_truncation(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(3):
        writer.add_scalar("x", float(step), step)
    writer.close()
    (event_file,) = list(tmp_path.glob("*tfevents*"))
    data = event_file.read_bytes()
    truncated = tmp_path / "cut" / "events.out.tfevents.cut"
    truncated.parent.mkdir()
    truncated.write_bytes(data[:-3])  # last record incomplete, as while a writer is still open
    assert metrics_lib.read_tensorboard_scalars(truncated)["x"] == [(0, 0.0), (1, 1.0)]
    corrupt = bytearray(data)
    corrupt[-6] ^= 0xFF  # flip a byte inside the last payload
    bad = tmp_path / "bad.tfevents"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt record payload"):
        metrics_lib.read_tensorboard_scalars(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        metrics_lib.read_tensorboard_scalars(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics_lib.read_tensorboard_scalars(tmp_path / "missing")


def test_side_by_side_with_the_project_pixelate():
    from vaopd_jax.data import processor, synthetic

    image = synthetic.render_scene(synthetic.sample_scene(np.random.default_rng(0), size=64))
    pixelated = processor.pixelate(image, ratio=0.1)
    out = np.asarray(diagnostics.side_by_side(image, pixelated, labels=None, gap=4))
    np.testing.assert_array_equal(out[:, :64], np.asarray(image))
    np.testing.assert_array_equal(out[:, 68:], np.asarray(pixelated))
    assert not np.array_equal(out[:, :64], out[:, 68:])  # the texture is gone on the right


def test_token_texts_keeps_split_characters_whole():
    # A byte-level vocabulary where "é" (c3 a9) and "²" (c2 b2) are split across two tokens each.
    vocab = {0: b"caf", 1: b"\xc3", 2: b"\xa9", 3: b" x", 4: b"\xc2", 5: b"\xb2", 6: b"!"}

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    ids = np.array([0, 1, 2, 3, 4, 5, 6])
    texts = diagnostics.token_texts(decode, ids)
    assert texts == ["caf", "", "é", " x", "", "²", "!"]
    assert "".join(texts) == decode(list(ids))
    # An incomplete character at the very end stays on the last token.
    assert diagnostics.token_texts(decode, [0, 1]) == ["caf", "\ufffd"]
    assert diagnostics.token_texts(decode, []) == []


def test_va_top_tokens_names_the_tokens_and_agrees_with_the_step():
    import jax.numpy as jnp

    from vaopd_jax.distill import teacher as teacher_lib

    # 2 rollouts x 10 tokens; 20 valid tokens -> the top 2. The fine-detail token 7 carries the most VA.
    va = np.zeros((2, 10))
    va[0, 3], va[1, 5], va[1, 2], va[0, 0] = 1.0, 0.6, 0.2, 0.2
    mask = np.ones((2, 10))
    mask[1, 9] = 0
    va[1, 9] = 50.0  # masked: ignored
    ids = np.arange(20).reshape(2, 10) % 5 + 100
    ids[0, 3] = ids[1, 5] = 7
    report = diagnostics.va_top_tokens(va, mask, ids, lambda t: f"<{t[0]}>", critical_token_ids=[7])
    assert report["num_top"] == 2  # ceil(0.1 x 19)
    assert report["top_share"] == pytest.approx(1.6 / 2.0)
    assert report["top_critical_share"] == pytest.approx(1.0)
    assert report["critical_share"] == pytest.approx(0.8)
    assert report["tokens"] == [("<7>", pytest.approx(1.0), 2)]
    in_graph = teacher_lib.va_concentration(jnp.asarray(va), jnp.asarray(mask), jnp.asarray(ids), (7,))
    assert float(in_graph["top_share"]) == pytest.approx(report["top_share"], abs=1e-6)
    assert float(in_graph["top_critical_share"]) == pytest.approx(1.0, abs=1e-6)
    assert float(in_graph["critical_share"]) == pytest.approx(0.8, abs=1e-6)
    assert float(in_graph["critical_token_share"]) == pytest.approx(2 / 19, abs=1e-6)
    # no VA mass (standard OPD): the step reports zeros, the diagnostics NaN
    zero = teacher_lib.va_concentration(jnp.zeros((2, 10)), jnp.asarray(mask), jnp.asarray(ids), (7,))
    assert float(zero["top_share"]) == 0.0 and float(zero["critical_token_share"]) > 0
    assert math.isnan(diagnostics.va_top_tokens(np.zeros((2, 10)), mask, ids, str)["top_share"])
    # uniform VA: the top 10 % carry 10 % (one token in ten)
    uniform = teacher_lib.va_concentration(jnp.ones((1, 10)), jnp.ones((1, 10)), jnp.zeros((1, 10), jnp.int32))
    assert float(uniform["top_share"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="token_ids has shape"):
        diagnostics.va_top_tokens(va, mask, ids[:, :5], str)
    with pytest.raises(ValueError, match="no valid token"):
        diagnostics.va_top_tokens(va, np.zeros_like(mask), ids, str)


def test_synthetic_critical_ids_are_the_fine_detail_words():
    from vaopd_jax.data import synthetic
    from vaopd_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids = synthetic.critical_token_ids(tok)
    assert sorted(tok.decode([i]).strip() for i in ids) == sorted(
        [*synthetic.DETAIL_WORDS.values(), *synthetic.PATTERNS])
    # the fine-detail tokens of a taught reply are exactly its critical positions and its answer
    rec = synthetic.SyntheticSource(50, seed=9, fine_fraction=1.0)[0]
    info = synthetic.reply_token_info(tok, rec["reply"], rec["task"])
    assert [i for i, t in enumerate(info["ids"]) if t in ids] == info["critical"] + info["answer"]


def test_va_concentration_from_logs_reads_the_trainers_scalars(tmp_path):
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=2, console_every=10)
    for step, share in ((1, 0.5), (2, 0.9)):
        logger.log_train(step, {"loss": 1.0, "va_top_share": share, "va_top_critical_share": share / 2},
                         rollout_s=1.0, update_s=1.0, tokens=10)
    logger.close()
    logs = diagnostics.va_concentration_from_logs(tmp_path / "tb")
    assert logs == {"train/va_top_share": [(1, 0.5), (2, pytest.approx(0.9))],
                    "train/va_top_critical_share": [(1, 0.25), (2, pytest.approx(0.45))]}
