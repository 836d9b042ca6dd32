"""The authors' release image path, written from its rules (docs/method.md "Pixelated view"), not from the
project's code: the reference the processor and pipeline tests compare against.

Sources: EasyR1 `verl/utils/dataset.py::process_image` (bounds resize + RGB), the release's
`va_opd/images.py::pixelate_image`, applied by the trainer to `process_image`'s output.
"""

import math

import numpy as np
from PIL import Image


def mode_image(height, width, mode, seed):
    """Noise image in any of the modes the release path meets: RGB, RGBA, L, P, P+transparency, 1."""
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode in ("RGB", "L", "1"):
        return rgb.convert(mode)
    palette = rgb.convert("P")  # WEB palette, dithered
    if mode == "P+transparency":
        palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    return palette


def release_pixelate(image, ratio):
    """Palette in RGB, 1-bit in L, BILINEAR down to max(1, int(side * ratio)), NEAREST up, back to the mode."""
    w, h = image.size
    work = image.convert("RGB") if image.mode == "P" else image.convert("L") if image.mode == "1" else image
    out = work.resize((max(1, int(w * ratio)), max(1, int(h * ratio))), Image.BILINEAR).resize((w, h), Image.NEAREST)
    return out.convert(image.mode) if out.mode != image.mode else out


def release_views(image, ratio, min_pixels, max_pixels):
    """(original, pixelated) PIL images the release hands the processor.

    Pillow's default filter: NEAREST for "1"/"P", BICUBIC otherwise; int() sizes; the max bound first,
    then the min bound; convert("RGB") without compositing; pixelate THAT image.
    """
    def resize(img, factor):
        resample = Image.NEAREST if img.mode in ("1", "P") else Image.BICUBIC
        return img.resize((int(img.width * factor), int(img.height * factor)), resample)

    if image.width * image.height > max_pixels:
        image = resize(image, math.sqrt(max_pixels / (image.width * image.height)))
    if image.width * image.height < min_pixels:
        image = resize(image, math.sqrt(min_pixels / (image.width * image.height)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, release_pixelate(image, ratio)
