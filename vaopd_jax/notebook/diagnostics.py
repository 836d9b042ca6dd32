"""Visual-advantage (VA) diagnostics people can look at.

The claim of VA-OPD (docs/method.md) is that the student learns to look where
the teacher looks. These functions make that visible:

- ``va_concentration_curve`` / ``top_fraction_share``: how concentrated VA mass
  is (the paper: the top 10 % of tokens carry ~93 % of it).
- ``va_summary``: the scalars worth logging (mean VA, max, top-10 % share).
- ``va_top_tokens``: which tokens carry the top 10 % of VA (e.g. the synthetic task's fine-detail words), and
  ``va_concentration_from_logs``: the trainer's concentration scalars (train/va_top_share, ...) read back.
- ``va_token_html`` / ``va_token_png``: one rollout's text, each token shaded
  by its VA (HTML for notebooks, PNG for TensorBoard and the README);
  ``token_texts`` decodes the per-token strings they take.
- ``side_by_side``: an image and its pixelated copy next to each other.
- ``plot_curves``: training curves such as mean student VA (OPD vs VA-OPD).
- ``log_va_diagnostics``: all of the above into a tensorboardX writer.
(Read tensorboard logs back with ``metrics.read_tensorboard_scalars`` / ``metrics.iter_events``.)

Everything here is host-side numpy / PIL / matplotlib (Agg, headless); jax
arrays are accepted and converted with ``np.asarray``. VA arrays are the
output of ``objective.visual_advantage`` (Eq. 2): non-negative, (R, T) for a
batch of rollouts or (T,) for one, with a response mask of the same shape.

Regenerate the README pictures with ``python -m vaopd_jax.notebook.diagnostics docs/images``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour map for token shading: white at VA = 0 so scaffolding tokens stay
# unshaded and only vision-critical tokens stand out.
_CMAP_NAME = "Reds"


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _as_float_array(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype=object")
    return array.astype(np.float64)


def _mask_array(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of `shape`; None means every position is valid."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask_array = np.asarray(mask)
    if mask_array.shape != shape:
        raise ValueError(f"mask shape {mask_array.shape} must equal va shape {shape}")
    return mask_array.astype(bool)


def _valid_va(va: Any, mask: Any = None) -> np.ndarray:
    """The VA values at valid positions, flattened: (n,) float64.

    Masked positions are never inspected (padding may hold garbage). Valid
    values must be finite and >= 0, because Eq. 2 clamps VA at zero; a negative
    value means a raw log-prob difference was passed instead of VA.
    """
    va_array = _as_float_array(va, "va")
    mask_array = _mask_array(mask, va_array.shape)
    valid = va_array[mask_array]
    if not np.all(np.isfinite(valid)):
        bad = int(np.sum(~np.isfinite(valid)))
        raise ValueError(f"va has {bad} non-finite value(s) at valid (mask=1) positions")
    if valid.size and valid.min() < 0:
        raise ValueError(
            f"va must be >= 0 at valid positions (Eq. 2 clamps VA at 0), got min {valid.min():.6g}; "
            "pass objective.visual_advantage(...) rather than a raw log-prob difference"
        )
    return valid


# ---------------------------------------------------------------------------
# Concentration of VA mass
# ---------------------------------------------------------------------------


def va_concentration_curve(va: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Share of total VA mass carried by the top x of valid tokens.

    Args:
      va: (R, T) or (T,) non-negative VA (Eq. 2); numpy or jax array.
      mask: same shape, 1 = valid response token; None = all valid. All valid
        tokens of all rollouts are pooled.

    Returns:
      (fractions, share), both (n + 1,) float64 for n valid tokens:
      fractions[k] = k / n and share[k] = (sum of the k largest VA) / (total VA).
      share[0] = 0, share[n] = 1, non-decreasing and concave. If the total VA
      mass is zero the concentration is undefined and share is all NaN.

    Raises:
      ValueError: no valid token, shape mismatch, or negative / non-finite VA.
    """
    valid = _valid_va(va, mask)
    n = valid.size
    if n == 0:
        raise ValueError("va_concentration_curve needs at least one valid token; mask has none")
    fractions = np.arange(n + 1, dtype=np.float64) / n
    total = valid.sum()
    if total <= 0:
        return fractions, np.full(n + 1, np.nan)
    descending = np.sort(valid)[::-1]
    share = np.concatenate([[0.0], np.cumsum(descending)]) / total
    share[-1] = 1.0  # exact despite rounding in the cumulative sum
    return fractions, share


def top_fraction_share(va: Any, mask: Any = None, fraction: float = 0.1) -> float:
    """Share of VA mass carried by the top `fraction` of valid tokens.

    Reads the concentration curve at `fraction`, interpolating linearly
    between whole tokens, so uniform VA gives exactly `fraction` for any token
    count and a single non-zero token among ten gives 1.0 at fraction 0.1.
    The paper reports ~0.93 at fraction 0.1.

    Args:
      va, mask: as in `va_concentration_curve`.
      fraction: in [0, 1].

    Returns:
      float in [0, 1]; NaN if the total VA mass is zero.
    """
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    fractions, share = va_concentration_curve(va, mask)
    return float(np.interp(fraction, fractions, share))


def va_summary(va: Any, mask: Any = None, top_fraction: float = 0.1) -> dict[str, float]:
    """Scalars worth logging for a batch of VA (docs/method.md, diagnostics).

    Args:
      va, mask: as in `va_concentration_curve`.
      top_fraction: fraction for the concentration scalar.

    Returns:
      {"mean": mean VA over valid tokens (the paper's "mean VA"),
       "max": largest VA, "nonzero_fraction": fraction of valid tokens with VA > 0,
       "top10_share" (key uses round(100 * top_fraction)): `top_fraction_share`,
       "num_tokens": number of valid tokens}. With no valid token every value
      except num_tokens is NaN; with zero total mass the share is NaN.
    """
    valid = _valid_va(va, mask)
    share_key = f"top{round(100 * top_fraction)}_share"
    if valid.size == 0:
        return {"mean": math.nan, "max": math.nan, "nonzero_fraction": math.nan, share_key: math.nan,
                "num_tokens": 0.0}
    return {
        "mean": float(valid.mean()),
        "max": float(valid.max()),
        "nonzero_fraction": float(np.mean(valid > 0)),
        share_key: top_fraction_share(valid, None, top_fraction),
        "num_tokens": float(valid.size),
    }


def va_top_tokens(va: Any, mask: Any, token_ids: Any, decode: Callable[[list[int]], str], *,
                  fraction: float = 0.1, critical_token_ids: Sequence[int] = (), limit: int = 10) -> dict:
    """Which tokens carry the VA mass of a batch of rollouts.

    The top tokens are the ceil(fraction x n) valid tokens with the largest VA (n valid tokens, ties: earlier
    first), the rule of the trainer's ``train/va_top_share`` (`distill.teacher.va_concentration`).

    Args:
      va, mask: (R, T) or (T,) VA and response mask; token_ids: the same shape, the sampled token ids.
      decode: ids -> text (``tokenizer.decode``).
      critical_token_ids: the task's vision-critical ids (``data.synthetic.critical_token_ids``).
      limit: how many token texts to list.
    Returns:
      {"top_share": share of all VA mass on the top tokens, "top_critical_share": share of the top tokens' mass
       on critical ids, "critical_share": share of all mass on critical ids, "num_top": number of top tokens,
       "tokens": [(text, share of the top tokens' mass, count among the top tokens)] for the `limit` texts with
       the most mass, largest first}. Shares are NaN when the VA mass is zero.
    """
    va_array = _as_float_array(va, "va")
    mask_array = _mask_array(mask, va_array.shape)
    ids = np.asarray(token_ids)
    if ids.shape != va_array.shape:
        raise ValueError(f"token_ids has shape {ids.shape}, expected the VA's {va_array.shape}")
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    values, valid_ids = va_array[mask_array], ids[mask_array]
    if values.size == 0:
        raise ValueError("va_top_tokens: no valid token (the mask is all zero)")
    order = np.argsort(-values, kind="stable")[:math.ceil(fraction * values.size)]
    total, top_mass = float(values.sum()), float(values[order].sum())
    critical = np.isin(valid_ids, np.asarray(list(critical_token_ids), np.int64))
    share = lambda part, whole: part / whole if whole > 0 else math.nan  # noqa: E731
    by_text: dict[str, list[float]] = {}
    for i in order:
        entry = by_text.setdefault(decode([int(valid_ids[i])]), [0.0, 0])
        entry[0] += float(values[i])
        entry[1] += 1
    tokens = sorted(((text, share(mass, top_mass), count) for text, (mass, count) in by_text.items()),
                    key=lambda item: -item[1] if math.isfinite(item[1]) else 0.0)[:limit]
    return {"top_share": share(top_mass, total),
            "top_critical_share": share(float(values[order][critical[order]].sum()), top_mass),
            "critical_share": share(float(values[critical].sum()), total), "num_top": int(order.size),
            "tokens": tokens}


CONCENTRATION_TAGS = ("train/va_top_share", "train/va_top_critical_share", "train/va_critical_share",
                      "train/va_critical_token_share")


def va_concentration_from_logs(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """The trainer's VA-concentration scalars from a run's tensorboard logs (``<workdir>/tb``): tag ->
    [(step, value)] for the tags of `CONCENTRATION_TAGS` that were logged (VA methods only; OPD logs none)."""
    from vaopd_jax.runtime import metrics as metrics_lib

    scalars = metrics_lib.read_tensorboard_scalars(str(logdir))
    return {tag: scalars[tag] for tag in CONCENTRATION_TAGS if tag in scalars}


# ---------------------------------------------------------------------------
# Token-level view of one rollout
# ---------------------------------------------------------------------------


def token_texts(decode: Callable[[list[int]], str], token_ids: Sequence[int]) -> list[str]:
    """The display text of each token, for `va_token_html` / `va_token_png`.

    Byte-level BPE splits some characters (accents, CJK, ``²``) across tokens,
    so decoding tokens one by one shows U+FFFD. Here a token whose text would
    end in an incomplete character gets "" and the character is shown on the
    token that completes it; the texts always join to ``decode(token_ids)``
    (up to a trailing incomplete character, kept on the last token).

    Args:
      decode: ids → text, e.g. ``tokenizer.decode`` (pass
        ``functools.partial(tokenizer.decode, skip_special_tokens=False)`` to
        show ``<|im_end|>``).
      token_ids: (T,) ids of one rollout (list, numpy or jax array).

    Returns:
      T strings.
    """
    ids = [int(token_id) for token_id in np.asarray(token_ids).reshape(-1)]
    texts: list[str] = []
    start = 0  # first id whose text is not yet shown
    for index in range(len(ids)):
        text = decode(ids[start:index + 1])
        if text.endswith("\ufffd") and index + 1 < len(ids):
            texts.append("")  # incomplete character: wait for the token that completes it
            continue
        texts.append(text)
        start = index + 1
    return texts


def _one_rollout(tokens_text: Sequence[str], va: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """(T,) VA with masked entries zeroed and (T,) bool mask, validated against tokens."""
    va_array = _as_float_array(va, "va")
    if va_array.ndim != 1:
        raise ValueError(f"va must be (T,) for one rollout, got shape {va_array.shape}; index one row of (R, T)")
    if len(tokens_text) != va_array.shape[0]:
        raise ValueError(f"tokens_text has {len(tokens_text)} entries but va has T={va_array.shape[0]}")
    for index, token in enumerate(tokens_text):
        if not isinstance(token, str):
            raise ValueError(f"tokens_text[{index}] must be str, got {type(token).__name__}")
    mask_array = _mask_array(mask, va_array.shape)
    _valid_va(va_array, mask_array)
    return np.where(mask_array, va_array, 0.0), mask_array


def _resolve_vmax(va: np.ndarray, mask: np.ndarray, vmax: float | None) -> float:
    """Colour scale top: the given vmax, else the largest valid VA (1.0 if all zero)."""
    if vmax is not None:
        if not (vmax > 0 and math.isfinite(vmax)):
            raise ValueError(f"vmax must be a finite number > 0, got {vmax}")
        return float(vmax)
    largest = float(va[mask].max()) if mask.any() else 0.0
    return largest if largest > 0 else 1.0


def _token_colors(va: np.ndarray, vmax: float) -> np.ndarray:
    """(T,) VA → (T, 3) uint8 RGB background colours on the Reds map, clipped at vmax."""
    from matplotlib import colormaps  # lazy: keeps `import vaopd_jax.notebook.diagnostics` cheap

    levels = np.clip(va / vmax, 0.0, 1.0)
    rgba = colormaps[_CMAP_NAME](levels)
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def _text_color(background: np.ndarray) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (relative luminance, ITU-R BT.709)."""
    r, g, b = (float(c) / 255 for c in background)
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else (255, 255, 255)


def va_token_html(tokens_text: Sequence[str], va: Any, mask: Any = None, *, vmax: float | None = None,
                  show_masked: bool = False, legend: bool = True) -> str:
    """HTML of one rollout with each token's background shaded by its VA.

    Args:
      tokens_text: T strings, the decoded text of each token (e.g.
        ``[tokenizer.decode([i]) for i in ids]``). Text is HTML-escaped.
      va: (T,) non-negative VA of the rollout.
      mask: (T,) 1 = response token; None = all. Masked tokens are left out,
        or shown grey and unshaded with ``show_masked=True``.
      vmax: VA at full colour (default: the rollout's largest VA), so several
        rollouts can share one scale.
      legend: append a one-line colour scale.

    Returns:
      A self-contained ``<div>`` (inline styles; whitespace and newlines kept)
      for ``IPython.display.HTML``. Hovering a token shows its VA.
    """
    va_row, mask_row = _one_rollout(tokens_text, va, mask)
    top = _resolve_vmax(va_row, mask_row, vmax)
    colors = _token_colors(va_row, top)
    spans = []
    for token, value, valid, color in zip(tokens_text, va_row, mask_row, colors):
        text = html.escape(token, quote=True)
        if not valid:
            if show_masked:
                spans.append(f'<span style="color:#999999" title="masked">{text}</span>')
            continue
        fg = "#%02x%02x%02x" % _text_color(color)
        bg = "#%02x%02x%02x" % tuple(int(c) for c in color)
        spans.append(f'<span style="background-color:{bg};color:{fg}" title="VA {value:.4g}">{text}</span>')
    body = "".join(spans)
    parts = ['<div class="va-tokens" style="font-family:monospace;white-space:pre-wrap;line-height:1.6">',
             body, "</div>"]
    if legend:
        low, high = ("#%02x%02x%02x" % tuple(int(c) for c in rgb) for rgb in _token_colors(np.array([0.0, top]), top))
        parts.append(
            '<div class="va-legend" style="font-family:sans-serif;font-size:small">'
            f'VA <span style="background:linear-gradient(to right,{low},{high});padding:0 4em"></span> '
            f"0 … {top:.3g}</div>"
        )
    return "".join(parts)


def _load_font(font_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, wide Unicode coverage) at `font_size` px."""
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), font_size)
    except OSError:  # no FreeType in this Pillow build
        return ImageFont.load_default(font_size)


def _layout_tokens(pieces: Sequence[tuple[str, int]], font, width: int, pad: int,
                   line_height: int) -> tuple[list[tuple[int, int, int, str, int]], int]:
    """Greedy line wrapping of (text, token_index) pieces.

    Returns boxes (x, line, box_width, text, token_index) and the line count.
    A newline in a token starts a new line; a piece that does not fit moves to
    the next line; a piece wider than a whole line is split by characters.
    """
    usable = width - 2 * pad
    boxes: list[tuple[int, int, int, str, int]] = []
    x, line = pad, 0
    for text, token_index in pieces:
        for part_index, part in enumerate(text.replace("\r", "").replace("\t", "    ").split("\n")):
            if part_index > 0:
                x, line = pad, line + 1
            while part:
                part_width = math.ceil(font.getlength(part))
                if x + part_width > pad + usable and x > pad:
                    x, line = pad, line + 1
                    continue
                if part_width > usable:  # a single over-long token: cut to what fits
                    cut = len(part)
                    while cut > 1 and math.ceil(font.getlength(part[:cut])) > usable:
                        cut -= 1
                    chunk, part = part[:cut], part[cut:]
                    chunk_width = math.ceil(font.getlength(chunk))
                    boxes.append((x, line, chunk_width, chunk, token_index))
                    x, line = pad, line + 1
                    continue
                boxes.append((x, line, part_width, part, token_index))
                x += part_width
                part = ""
    return boxes, line + 1


def va_token_png(tokens_text: Sequence[str], va: Any, mask: Any = None, path: str | os.PathLike | None = None, *,
                 width: int = 800, font_size: int = 16, vmax: float | None = None, show_masked: bool = False,
                 legend: bool = True) -> Image.Image | str:
    """The `va_token_html` view rendered as an RGB image (PIL, headless).

    Layout: padding ``pad = font_size // 2``, line height
    ``line_height = round(1.5 * font_size)``; text wraps at ``width``. The
    image is ``width`` wide and ``2 * pad + n_lines * line_height`` tall, plus
    ``2 * line_height`` for the colour scale when ``legend=True``. The first
    shown token's box starts at (pad, pad).

    Args:
      tokens_text, va, mask, vmax, show_masked, legend: as in `va_token_html`.
      path: where to save a PNG; None returns the image instead.
      width: image width in px (>= 4 * font_size).
      font_size: px.

    Returns:
      `path` (as str) if given, else a PIL RGB image.
    """
    if font_size < 6:
        raise ValueError(f"font_size must be >= 6 px, got {font_size}")
    if width < 4 * font_size:
        raise ValueError(f"width must be >= 4 * font_size = {4 * font_size} px, got {width}")
    va_row, mask_row = _one_rollout(tokens_text, va, mask)
    top = _resolve_vmax(va_row, mask_row, vmax)
    colors = _token_colors(va_row, top)
    font = _load_font(font_size)
    pad, line_height = font_size // 2, round(1.5 * font_size)

    pieces = [(token, index) for index, token in enumerate(tokens_text) if mask_row[index] or show_masked]
    boxes, n_lines = _layout_tokens(pieces, font, width, pad, line_height)
    text_height = 2 * pad + n_lines * line_height
    height = text_height + (2 * line_height if legend else 0)

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for x, line, box_width, text, token_index in boxes:
        y = pad + line * line_height
        if mask_row[token_index]:
            background = colors[token_index]
            draw.rectangle([x, y, x + box_width - 1, y + line_height - 1], fill=tuple(int(c) for c in background))
            fill = _text_color(background)
        else:
            fill = (153, 153, 153)
        draw.text((x, y + line_height // 2), text, font=font, fill=fill, anchor="lm")

    if legend:
        # A horizontal colour bar from VA 0 to vmax with its end values.
        y0 = text_height + line_height // 4
        label_width = math.ceil(font.getlength("VA  "))
        bar_x0, bar_x1 = pad + label_width, min(width - pad - 4 * font_size, pad + label_width + 12 * font_size)
        bar_x1 = max(bar_x1, bar_x0 + 2)
        ramp = _token_colors(np.linspace(0.0, top, bar_x1 - bar_x0), top)
        bar = np.repeat(ramp[None], line_height // 2, axis=0)
        canvas.paste(Image.fromarray(bar, "RGB"), (bar_x0, y0))
        draw.rectangle([bar_x0 - 1, y0 - 1, bar_x1, y0 + line_height // 2], outline=(120, 120, 120))
        middle = y0 + line_height // 4
        draw.text((pad, middle), "VA", font=font, fill=(0, 0, 0), anchor="lm")
        draw.text((bar_x1 + pad, middle), f"0 … {top:.3g}", font=font, fill=(0, 0, 0), anchor="lm")

    if path is None:
        return canvas
    canvas.save(path, format="PNG")
    return str(path)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _to_rgb_image(image: Any, name: str) -> Image.Image:
    """PIL image, uint8 (H, W) / (H, W, 3|4) array, or float array in [0, 1] → PIL RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{name} must be a PIL image or an (H, W), (H, W, 1|3|4) array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise ValueError(f"{name} is a float array with values outside [0, 1] "
                             f"(min {np.nanmin(array):.4g}, max {np.nanmax(array):.4g}); pass uint8 for 0..255")
        array = np.round(array * 255)
    elif array.dtype != np.uint8:
        raise ValueError(f"{name} array dtype must be uint8 or float in [0, 1], got {array.dtype}")
    array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def side_by_side(image: Any, pixelated: Any, *, labels: tuple[str, str] | None = ("original", "pixelated"),
                 gap: int = 8, font_size: int = 14) -> Image.Image:
    """The image and its pixelated copy (e.g. ``processor.pixelate(image, 0.1)``) side by side.

    Args:
      image, pixelated: PIL images or uint8 (H, W[, C]) / float [0, 1] arrays.
      labels: captions above each picture, or None for no caption band.
      gap: white px between the two pictures.
      font_size: caption size in px.

    Returns:
      PIL RGB image, ``w1 + gap + w2`` wide and ``max(h1, h2) + band`` tall,
      where band = ``round(1.5 * font_size)`` with labels, else 0; the
      original's top-left pixel lands at (0, band), the copy's at (w1 + gap, band).
    """
    if gap < 0:
        raise ValueError(f"gap must be >= 0 px, got {gap}")
    left, right = _to_rgb_image(image, "image"), _to_rgb_image(pixelated, "pixelated")
    band = round(1.5 * font_size) if labels is not None else 0
    width = left.width + gap + right.width
    canvas = Image.new("RGB", (width, max(left.height, right.height) + band), "white")
    canvas.paste(left, (0, band))
    canvas.paste(right, (left.width + gap, band))
    if labels is not None:
        if len(labels) != 2:
            raise ValueError(f"labels must be two captions or None, got {labels!r}")
        font = _load_font(font_size)
        draw = ImageDraw.Draw(canvas)
        draw.text((left.width // 2, band // 2), labels[0], font=font, fill=(0, 0, 0), anchor="mm")
        draw.text((left.width + gap + right.width // 2, band // 2), labels[1], font=font, fill=(0, 0, 0), anchor="mm")
    return canvas


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _render_figure(figure, path: str | os.PathLike | None) -> Image.Image | str:
    """Save a matplotlib Figure to `path` (PNG) or return it as a PIL RGB image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    if path is not None:
        figure.savefig(path, format="png")
        return str(path)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy(), "RGB")


def plot_curves(history: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike | None = None, *,
                title: str | None = None, xlabel: str = "step", ylabel: str | None = None,
                figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 100) -> Image.Image | str:
    """Training curves, one line per series, e.g. mean student VA for OPD vs VA-OPD.

    Args:
      history: series name → [(step, value), ...] (any order; sorted by step;
        NaN values leave gaps). ``metrics.read_tensorboard_scalars(logdir)`` returns this form.
      path: PNG path, or None to return a PIL image.
      title, xlabel, ylabel: axis text.
      figsize, dpi: the image is ``figsize * dpi`` px (width, height).

    Returns:
      `path` (as str) if given, else a PIL RGB image. Series use matplotlib's
      default colour cycle (C0, C1, ...) in the order of `history`.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    if not history:
        raise ValueError("history is empty; pass {series name: [(step, value), ...]}")
    figure = Figure(figsize=figsize, dpi=dpi)
    axes = figure.add_subplot(1, 1, 1)
    for name, points in history.items():
        points = list(points)
        if not points:
            raise ValueError(f"history[{name!r}] has no (step, value) points")
        try:
            pairs = sorted((float(step), float(value)) for step, value in points)
        except (TypeError, ValueError) as error:
            raise ValueError(f"history[{name!r}] must be a list of (step, value) pairs: {error}") from None
        steps, values = zip(*pairs)
        axes.plot(steps, values, marker="o" if len(pairs) <= 20 else None, markersize=3, label=name)
    axes.set_xlabel(xlabel)
    if ylabel:
        axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _render_figure(figure, path)


def plot_concentration(va: Any, mask: Any = None, path: str | os.PathLike | None = None, *,
                       label: str = "VA", figsize: tuple[float, float] = (4.0, 4.0),
                       dpi: int = 100) -> Image.Image | str:
    """The sorted-VA concentration curve with its top-10 % share marked.

    Args:
      va, mask: as in `va_concentration_curve` (zero total mass is an error here).
      path: PNG path, or None to return a PIL image.
      label: legend name of the curve.
      figsize, dpi: image size ``figsize * dpi`` px.
    """
    from matplotlib.figure import Figure

    fractions, share = va_concentration_curve(va, mask)
    if np.isnan(share).any():
        raise ValueError("plot_concentration: total VA mass is zero, the concentration curve is undefined")
    top10 = float(np.interp(0.1, fractions, share))
    figure = Figure(figsize=figsize, dpi=dpi)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(100 * fractions, 100 * share, label=label)
    axes.plot([0, 100], [0, 100], linestyle=":", color="grey", label="uniform")
    axes.plot([10], [100 * top10], marker="o", color="C3")
    axes.annotate(f"top 10 %: {100 * top10:.0f} %", (10, 100 * top10), textcoords="offset points",
                  xytext=(8, -14))
    axes.set_xlabel("top tokens by VA (%)")
    axes.set_ylabel("share of VA mass (%)")
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return _render_figure(figure, path)


# ---------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------


def log_va_diagnostics(writer, step: int, va: Any, mask: Any = None, tokens_text: Sequence[str] | None = None,
                       image: Any = None, pixelated: Any = None, *, prefix: str = "va", rollout_index: int = 0,
                       concentration_plot: bool = True) -> dict[str, float]:
    """Write VA diagnostics of one batch to a tensorboardX ``SummaryWriter``.

    Writes, under `prefix`:
      scalars ``mean``, ``max``, ``nonzero_fraction``, ``top10_share`` (`va_summary`;
        NaN values are skipped, e.g. the share when all VA is zero);
      histogram ``valid_tokens`` of the VA of valid tokens (if any);
      image ``concentration`` (`plot_concentration`) when `concentration_plot`
        and the VA mass is positive;
      image ``tokens`` (`va_token_png` of row `rollout_index`) when
        `tokens_text` (that rollout's T token strings) is given;
      image ``image_vs_pixelated`` (`side_by_side`) when `image` and
        `pixelated` are given (both or neither).
    The caller flushes / closes the writer.

    Args:
      writer: ``tensorboardX.SummaryWriter`` (anything with add_scalar,
        add_histogram, add_image).
      step: global step.
      va: (R, T) or (T,) non-negative VA; mask: same shape, 1 = response token.

    Returns:
      The `va_summary` dict (including NaNs and num_tokens), for console logs.
    """
    if (image is None) != (pixelated is None):
        raise ValueError("log_va_diagnostics: pass both image and pixelated, or neither")
    va_array = _as_float_array(va, "va")
    mask_array = _mask_array(mask, va_array.shape)
    summary = va_summary(va_array, mask_array)
    for key, value in summary.items():
        if key != "num_tokens" and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    valid = va_array[mask_array]
    if valid.size:
        writer.add_histogram(f"{prefix}/valid_tokens", valid, step)
        if concentration_plot and valid.sum() > 0:
            picture = plot_concentration(valid)
            writer.add_image(f"{prefix}/concentration", np.asarray(picture), step, dataformats="HWC")
    if tokens_text is not None:
        rows_va = va_array.reshape(-1, va_array.shape[-1])
        rows_mask = mask_array.reshape(-1, va_array.shape[-1])
        if not (0 <= rollout_index < rows_va.shape[0]):
            raise ValueError(f"rollout_index must be in [0, {rows_va.shape[0]}), got {rollout_index}")
        picture = va_token_png(tokens_text, rows_va[rollout_index], rows_mask[rollout_index])
        writer.add_image(f"{prefix}/tokens", np.asarray(picture), step, dataformats="HWC")
    if image is not None:
        picture = side_by_side(image, pixelated)
        writer.add_image(f"{prefix}/image_vs_pixelated", np.asarray(picture), step, dataformats="HWC")
    return summary


# ---------------------------------------------------------------------------
# README pictures from a hand-made example
# ---------------------------------------------------------------------------

# A geometry answer whose tokens read off the figure (the right angle, the
# side lengths) carry VA and the derived steps carry little: the pattern the
# paper reports. Hand-made values, for illustration only; Qwen's tokenizer splits
# numbers into single digits, as here.
_EXAMPLE_TOKENS = [
    ("In", 0.0), (" the", 0.0), (" figure", 0.01), (",", 0.0), (" triangle", 0.04), (" ABC", 0.12),
    (" has", 0.0), (" a", 0.0), (" right", 0.35), (" angle", 0.22), (" at", 0.0), (" B", 0.48),
    (",", 0.0), (" AB", 0.10), (" =", 0.0), (" ", 0.0), ("6", 0.86), (" and", 0.0), (" BC", 0.14),
    (" =", 0.0), (" ", 0.0), ("8", 0.92), (".", 0.0), ("\n", 0.0), ("By", 0.0), (" Pyth", 0.02),
    ("agoras", 0.0), (",", 0.0), (" AC", 0.05), (" =", 0.0), (" √", 0.0), ("(", 0.0), ("6", 0.06),
    ("²", 0.0), (" +", 0.0), (" ", 0.0), ("8", 0.05), ("²", 0.0), (")", 0.0), (" =", 0.0), (" ", 0.0),
    ("1", 0.01), ("0", 0.0), (".", 0.0), ("\n", 0.0), ("The", 0.0), (" answer", 0.0), (" is", 0.0),
    (" \\", 0.0), ("boxed", 0.0), ("{", 0.0), ("1", 0.02), ("0", 0.0), ("}", 0.0), (".", 0.0), ("<|im_end|>", 0.0),
]


def _write_readme_examples(out_dir: str) -> list[str]:
    """Write va_tokens_example.png, va_concentration_example.png and pixelated_example.png into out_dir."""
    from vaopd_jax.data import processor, synthetic

    os.makedirs(out_dir, exist_ok=True)
    tokens = [token for token, _ in _EXAMPLE_TOKENS]
    va = np.array([value for _, value in _EXAMPLE_TOKENS])
    mask = np.array([token != "<|im_end|>" for token in tokens])
    written = [
        va_token_png(tokens, va, mask, os.path.join(out_dir, "va_tokens_example.png"), width=720, font_size=18),
        plot_concentration(va, mask, os.path.join(out_dir, "va_concentration_example.png"),
                           label="hand-made example"),
    ]
    # A synthetic vision-critical scene (64 px, the demo's size) and its ratio-0.1 pixelated
    # view, both enlarged 4x with NEAREST so the pixels stay visible.
    scene = synthetic.sample_scene(np.random.default_rng(3), size=64)
    image = synthetic.render_scene(scene)
    pixelated = processor.pixelate(image, ratio=0.1)
    enlarge = lambda picture: picture.resize((4 * picture.width, 4 * picture.height), Image.NEAREST)  # noqa: E731
    pair = side_by_side(enlarge(image), enlarge(pixelated),
                        labels=(f"original ({scene.pattern} texture)", "pixelated, ratio 0.1"))
    pair_path = os.path.join(out_dir, "pixelated_example.png")
    pair.save(pair_path, format="PNG")
    written.append(pair_path)
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerates the README's VA illustration images.")
    parser.add_argument("output_dir", nargs="?", default="docs/images", help="where the PNGs go (default: %(default)s)")
    for written_path in _write_readme_examples(parser.parse_args().output_dir):
        print(written_path)
