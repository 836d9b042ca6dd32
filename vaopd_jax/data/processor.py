"""Qwen3-VL image processor, pixelated view and chat prompt (pure numpy + Pillow, no torch).

`preprocess_image` reproduces transformers' `Qwen2VLImageProcessorPil` with Qwen3-VL settings
(patch 16, spatial merge 2, temporal patch 2, mean = std = 0.5): RGB conversion (alpha composited
onto white), smart resize to multiples of 32, Pillow BICUBIC resize, rescale 1/255, normalize to
[-1, 1], the still image repeated to 2 frames, and patchify into rows of 3*2*16*16 = 1536 values in
(C, T, P, P) order, laid out in 2x2 merge-block order.

`pixelate` builds the VA-OPD pixelated view ṽ (docs/method.md, "Pixelated view").

`image_views` is the image path of the authors' release (handsome-rich/VA-OPD on EasyR1) step for
step, the default everywhere (`IMAGE_PATHS[0]`):
  1. `bound_pixels`: EasyR1's `verl/utils/dataset.py::process_image`: a Pillow resize into
     [min_pixels, max_pixels] (factor sqrt(bound / area), sizes truncated with int(), Pillow's
     default filter for the mode), then `convert("RGB")` (alpha dropped, no compositing);
  2. `pixelate` of THAT image (the release's trainer builds ṽ from `process_image`'s output:
     `PerceptionReasoningCorruptionBuilder._transform_multi_modal_data`);
  3. the Qwen processor (`preprocess_image`: smart_resize + patchify) on both.
`"single_resize"` is the older path: pixelate the decoded image, one smart resize, alpha composited.
One deliberate difference from the release on both paths: greyscale images deeper than 8 bits (16-bit PNG /
TIFF, float TIFF) are rescaled to 8 bits (`to_8bit`) before the RGB conversion, which would clip them at 255.

`build_prompt` turns a dataset question with `<image>` placeholders into the token ids of the
model's own chat template with each image expanded to t*h*w/4 `<|image_pad|>` tokens.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import numpy as np
from PIL import Image

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 32: each side of the resized image is a multiple of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536
MIN_PIXELS = 262_144  # paper recipe (docs/method.md defaults)
MAX_PIXELS = 4_194_304
IMAGE_PLACEHOLDER = "<image>"
# "release": bounds resize -> RGB -> pixelate -> processor (the release's path, see module docstring);
# "single_resize": pixelate the decoded image, then one smart resize per view.
IMAGE_PATHS = ("release", "single_resize")

# mm_token_type_ids values (transformers >= 5.3 convention, transformers' Qwen3-VL)
TOKEN_TYPE_TEXT = 0
TOKEN_TYPE_IMAGE = 1


def smart_resize(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Target (height, width) of the Qwen2-VL family resize.

    Each side is rounded to a multiple of `factor`; if the area exceeds `max_pixels` both sides are
    scaled by sqrt(HW/max) and floored to the factor; if below `min_pixels` scaled by sqrt(min/HW)
    and ceiled. Same arithmetic as transformers' `smart_resize` (so the same grids).

    Raises:
      ValueError: a side < 1, aspect ratio > 200, or min_pixels > max_pixels.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be >= 1x1, got height={height}, width={width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} must be <= max_pixels={max_pixels}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be <= 200, got {max(height, width) / min(height, width)} "
            f"for height={height}, width={width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_pil(image) -> Image.Image:
    """PIL image from a PIL image or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, C]), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    return Image.fromarray(array)


# Modes whose samples are wider than 8 bits: Pillow's convert("L"/"RGB") clips them at 255 (a 16-bit PNG whose
# values use its full range turns white), so `to_8bit` rescales them first.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Unusual images the pipeline converts and counts (`image_notes`), rather than skips.
IMAGE_NOTES = ("cmyk", "high_bit_depth", "animated")


def to_8bit(image: Image.Image) -> Image.Image:
    """An image Pillow can convert to RGB without losing it: 16-bit / 32-bit / float greyscale -> "L" rescaled
    to [0, 255]; premultiplied "La" -> "LA" (Pillow has no La -> RGB conversion); every other mode unchanged.

    The scale is the format's range: 65535 for "I;16*"; for "I" and "F" (Pillow's 32-bit int / float
    greyscale), 1 when every sample is within [0, 1] (float images), else 255 when within [0, 255], else 65535
    (16-bit data decoded as "I"); NaN counts as 0 and samples outside the range are clipped.
    """
    if image.mode == "La":
        return image.convert("LA")
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    samples = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        largest = float(samples.max()) if samples.size else 0.0
        scale = 1.0 if largest <= 1.0 and image.mode == "F" else 255.0 if largest <= 255.0 else 65535.0
    scaled = np.clip(np.rint(samples * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled.reshape(image.height, image.width))


def image_notes(image: Image.Image) -> tuple[str, ...]:
    """What `to_8bit` / the RGB conversion change about a decoded image (IMAGE_NOTES), for the pipeline's counts:
    CMYK converted to RGB, samples wider than 8 bits rescaled, only the first frame of an animation used
    (`sources.load_image` records ``info["n_frames"]``)."""
    notes = []
    if image.mode == "CMYK":
        notes.append("cmyk")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        notes.append("high_bit_depth")
    if int(image.info.get("n_frames", getattr(image, "n_frames", 1)) or 1) > 1:
        notes.append("animated")
    return tuple(notes)


def convert_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparency is composited onto white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_grid(
    height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int, int]:
    """image_grid_thw (t, h, w) in patches of an image of that size: (1, H'/16, W'/16)."""
    resized_h, resized_w = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return 1, resized_h // PATCH_SIZE, resized_w // PATCH_SIZE


def num_image_tokens(grid_thw: Sequence[int]) -> int:
    """Number of <|image_pad|> tokens of one image: t*h*w / merge**2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def patchify(image_chw: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 normalized image -> (H/16 * W/16, 1536) rows in 2x2 merge-block order.

    Row order is (block_row, block_col, row_in_block, col_in_block); values in (C, T, P, P) order
    with the still image repeated over T = 2 frames (Qwen2VLImageProcessorPil.patchify).
    """
    channels, height, width = image_chw.shape
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    patches = image_chw.reshape(
        channels, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    )
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/2, gw/2, 2, 2, C, P, P)
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None], patches.shape[:5] + (TEMPORAL_PATCH_SIZE,) + patches.shape[5:]
    )
    return np.ascontiguousarray(patches).reshape(gh * gw, PATCH_DIM)


def preprocess_image(
    image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (pixel_values (N, 1536) float32, image_grid_thw (3,) int64), N = h*w patches.

    Args:
      image: PIL.Image (any mode) or uint8 array (H, W[, C]).
      min_pixels, max_pixels: smart-resize area bounds (paper: 262,144 / 4,194,304).
    """
    pil = convert_rgb(to_8bit(to_pil(image)))
    width, height = pil.size
    resized_h, resized_w = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    # Pillow BICUBIC on uint8 exactly as transformers' PIL backend (always resizes, even to the same size).
    resized = pil.resize((resized_w, resized_h), resample=Image.BICUBIC)
    array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)
    # rescale 1/255 then normalize with mean = std = 0.5 -> [-1, 1]
    array = (array * np.float32(1.0 / 255.0) - np.float32(0.5)) / np.float32(0.5)
    rows = patchify(array)
    grid = np.array([1, resized_h // PATCH_SIZE, resized_w // PATCH_SIZE], dtype=np.int64)
    return rows, grid


def preprocess_images(
    images: Sequence, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values (sum N_i, 1536) float32, image_grid_thw (n_images, 3) int64)."""
    if not images:
        return np.zeros((0, PATCH_DIM), np.float32), np.zeros((0, 3), np.int64)
    out = [preprocess_image(im, min_pixels, max_pixels) for im in images]
    return np.concatenate([r for r, _ in out], axis=0), np.stack([g for _, g in out], axis=0)


def _continuous_mode(image: Image.Image) -> Image.Image:
    """Palette / 1-bit images -> a mode Pillow can interpolate (the single_resize path's pixelation input)."""
    if image.mode == "1":
        return image.convert("L")
    if image.mode == "P":
        return image.convert("RGBA" if image.info.get("transparency") is not None else "RGB")
    if image.mode == "PA":
        return image.convert("RGBA")
    return image


def check_pixelation_ratio(ratio, name: str = "pixelation ratio") -> float:
    """The release's ratio check: a finite real number in (0, 1]; booleans and strings are refused.

    Raises:
      ValueError: bool, non-numeric, NaN/inf, or outside (0, 1] (the release raises ValueError for all).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"{name} must be a finite number in (0, 1], got {ratio!r}")
    return float(ratio)


def pixelate(image, ratio: float = 0.1):
    """Pixelated view ṽ: BILINEAR down to max(1, int(side * ratio)) per side, NEAREST back up.

    The release's `va_opd/images.py::pixelate_image`, rule for rule: palette ("P", with or without
    transparency) is interpolated in RGB and 1-bit in L, and the result is converted back to the
    input's mode (P re-quantised with Pillow's default palette, 1-bit dithered); every other mode is
    resized as it is. Same size as the input, so ṽ gets exactly the grid / visual tokens of the original.
    Returns the same type as given: a PIL image in the input's mode, or a uint8 array of the same shape.

    Raises:
      ValueError: ratio not a finite number in (0, 1] (booleans and strings included).
    """
    ratio = check_pixelation_ratio(ratio)
    is_array = not isinstance(image, Image.Image)
    pil = to_pil(image)
    width, height = pil.size
    source = pil.convert("RGB") if pil.mode == "P" else pil.convert("L") if pil.mode == "1" else pil
    small = source.resize((max(1, int(width * ratio)), max(1, int(height * ratio))), Image.Resampling.BILINEAR)
    out = small.resize(pil.size, Image.Resampling.NEAREST)
    if out.mode != pil.mode:
        out = out.convert(pil.mode)
    if is_array:  # arrays are L/RGB/RGBA, so the shape round-trips exactly
        return np.asarray(out).reshape(np.asarray(image).shape)
    return out


def bound_pixels(image, min_pixels: int | None = MIN_PIXELS, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The release's dataset step (EasyR1 `process_image`): Pillow resize into the pixel bounds, then RGB.

    If w*h > max_pixels, resize by f = sqrt(max_pixels / (w*h)); then, if w*h < min_pixels, by
    f = sqrt(min_pixels / (w*h)); new sizes int(w*f) x int(h*f) (so the area may end a little below
    min_pixels); Pillow's default filter for the mode (NEAREST for "1"/"P", else BICUBIC). Then
    `convert("RGB")` for any other mode: alpha is dropped, not composited, and a palette's
    transparency is ignored. None disables a bound, as in the release.

    Raises:
      ValueError: a resize to a zero side (aspect ratios past ~4e6:1), from Pillow.
    """
    pil = to_8bit(to_pil(image))
    if max_pixels is not None and pil.width * pil.height > max_pixels:
        factor = math.sqrt(max_pixels / (pil.width * pil.height))
        pil = pil.resize((int(pil.width * factor), int(pil.height * factor)))
    if min_pixels is not None and pil.width * pil.height < min_pixels:
        factor = math.sqrt(min_pixels / (pil.width * pil.height))
        pil = pil.resize((int(pil.width * factor), int(pil.height * factor)))
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    return pil


def image_views(image, ratio: float = 0.1, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                image_path: str = "release"):
    """(original, pixelated) images the processor then turns into the two teacher views.

    image_path "release" (default): `bound_pixels` then `pixelate` of that RGB image (the release);
    "single_resize": the decoded image and its pixelation (palette / 1-bit interpolated in RGB(A) / L,
    as before), each resized once by `preprocess_image` with alpha composited onto white.
    Both returned images have the same size, so `preprocess_image` gives them the same grid.

    Raises:
      ValueError: an unknown image_path or a bad ratio.
    """
    if image_path == "release":
        original = bound_pixels(image, min_pixels, max_pixels)
        return original, pixelate(original, ratio)
    if image_path == "single_resize":
        original = to_8bit(to_pil(image))
        return original, pixelate(_continuous_mode(original), ratio)
    raise ValueError(f"image_path must be one of {IMAGE_PATHS}, got {image_path!r}")


def preprocess_views(image, ratio: float = 0.1, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     image_path: str = "release") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image -> (rows (N, 1536), pixelated rows (N, 1536), image_grid_thw (3,)) by `image_views`.

    Raises:
      ValueError: bad image_path / ratio, or an image smart_resize refuses (aspect ratio > 200).
    """
    original, pixelated = image_views(image, ratio, min_pixels, max_pixels, image_path)
    rows, grid = preprocess_image(original, min_pixels, max_pixels)
    rows_pix, grid_pix = preprocess_image(pixelated, min_pixels, max_pixels)
    if not np.array_equal(grid, grid_pix):  # cannot happen (same size); guards the VA alignment
        raise ValueError(f"pixelated grid {grid_pix} != original grid {grid}")
    return rows, rows_pix, grid


def model_image(image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                image_path: str = "release") -> Image.Image:
    """The image the processor is given on `image_path` (what the student sees; no pixelation)."""
    if image_path == "release":
        return bound_pixels(image, min_pixels, max_pixels)
    if image_path == "single_resize":
        return to_8bit(to_pil(image))
    raise ValueError(f"image_path must be one of {IMAGE_PATHS}, got {image_path!r}")


def split_question(question: str, num_images: int) -> list[dict]:
    """Chat content list for a question with `<image>` placeholders and `num_images` images.

    Each placeholder becomes an image item where it stands; a question without placeholders gets
    all its images at the start of the user turn (Qwen's usual message layout).

    Raises:
      ValueError: the number of placeholders is neither 0 nor num_images.
    """
    pieces = question.split(IMAGE_PLACEHOLDER)
    num_placeholders = len(pieces) - 1
    if num_placeholders == 0:
        content = [{"type": "image"} for _ in range(num_images)]
        if question:
            content.append({"type": "text", "text": question})
        return content
    if num_placeholders != num_images:
        raise ValueError(
            f"question has {num_placeholders} '{IMAGE_PLACEHOLDER}' placeholders but the record has "
            f"{num_images} images"
        )
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if i < num_placeholders:
            content.append({"type": "image"})
    return content


def build_messages(question: str, num_images: int) -> list[dict]:
    """Single user turn (no system prompt: docs/method.md uses the bare chat template)."""
    return [{"role": "user", "content": split_question(question, num_images)}]


def build_prompt(
    tokenizer, question: str, grid_thws: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt token ids in the tokenizer's own chat template, images expanded.

    Renders `<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\n` with the tokenizer's chat template (generation prompt on), tokenizes
    it, and expands the i-th <|image_pad|> to t*h*w/4 copies (what Qwen3VLProcessor does to the
    text; special tokens split the text so expanding after tokenization gives the same ids).

    Args:
      tokenizer: a Qwen3-VL tokenizer (see tokenizer.load_tokenizer).
      question: dataset question, `<image>` placeholders optional.
      grid_thws: one (t, h, w) per image, in order.
    Returns:
      input_ids (T,) int32 and mm_token_type_ids (T,) int32 (1 at <|image_pad|>, else 0).
    """
    text = tokenizer.apply_chat_template(
        build_messages(question, len(grid_thws)), tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    positions = [i for i, tok in enumerate(ids) if tok == image_pad_id]
    if len(positions) != len(grid_thws):
        raise ValueError(
            f"chat template produced {len(positions)} <|image_pad|> tokens for {len(grid_thws)} images "
            f"(question {question[:60]!r} may contain literal <|image_pad|> text)"
        )
    pieces: list[np.ndarray] = []
    types: list[np.ndarray] = []
    start = 0
    for pos, grid in zip(positions, grid_thws):
        pieces.append(np.asarray(ids[start:pos], np.int32))
        types.append(np.zeros(pos - start, np.int32))
        n = num_image_tokens(grid)
        pieces.append(np.full(n, image_pad_id, np.int32))
        types.append(np.full(n, TOKEN_TYPE_IMAGE, np.int32))
        start = pos + 1
    pieces.append(np.asarray(ids[start:], np.int32))
    types.append(np.zeros(len(ids) - start, np.int32))
    return np.concatenate(pieces), np.concatenate(types)

