"""Offline, deterministic vision-critical task for the demo and tests.

Every image (S x S pixels, default 64) holds three things:
  * a background colour (red / green / blue / yellow)            -> COARSE question
  * a big white disk in the left or the right half               -> COARSE question
  * a small digit (3x5 bitmap font scaled to ~S/6 pixels tall) in the other half, at a random
    position with a random ink strength                          -> FINE question
Pixelation at ratio 0.1 (S=64 -> 6x6 cells of ~11 px) keeps the colour and the disk side but
melts the digit into a blob a few grey levels deep whose shape no longer tells the digit
(tests/test_data_synthetic.py measures it). Answers are single Qwen tokens (a digit, a colour
word, left/right), so a tiny Qwen3-VL-shaped model learns the task on a CPU in minutes.

Records are generated on the fly from (seed, index): `SyntheticSource` is a picklable random-access
source for grain, as cheap to shard and shuffle as a file source.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "red": (200, 60, 60),
    "green": (60, 170, 80),
    "blue": (60, 90, 200),
    "yellow": (220, 200, 60),
}
SIDES = ("left", "right")
DIGITS = tuple("0123456789")
DISK_COLOR = (245, 245, 245)

# 3x5 bitmap font, rows top to bottom ('#' = ink).
_FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
}
GLYPHS = {d: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for d, rows in _FONT.items()}

QUESTIONS = {
    "digit": "<image>Which digit is drawn in the picture?",
    "background": "<image>What colour is the background?",
    "side": "<image>Is the big white disk on the left or on the right?",
}
KIND_OF_TASK = {"digit": "fine", "background": "coarse", "side": "coarse"}
ANSWER_VOCAB = {"digit": DIGITS, "background": tuple(BACKGROUNDS), "side": SIDES}


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image (so counterfactual scenes differ in one field)."""

    size: int
    background: str
    side: str  # where the disk is; the digit is in the other half
    disk_center: tuple[int, int]  # (x, y)
    disk_radius: int
    digit: str
    digit_origin: tuple[int, int]  # (x, y) top-left of the glyph
    digit_scale: int
    ink_alpha: float  # 0..1, how dark the digit is over the background


def sample_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """Random scene; all positions keep the disk and the digit inside their own halves."""
    if size < 32:
        raise ValueError(f"synthetic image size must be >= 32 pixels, got {size}")
    half = size // 2
    radius = max(4, int(round(0.2 * size)))
    side = SIDES[rng.integers(2)]
    cx = int(rng.integers(radius + 1, max(radius + 2, half - radius)))
    cy = int(rng.integers(radius + 1, size - radius - 1))
    if side == "right":
        cx = size - 1 - cx
    scale = max(1, size // 32)
    glyph_w, glyph_h = 3 * scale, 5 * scale
    margin = max(2, size // 16)
    gx = int(rng.integers(margin, half - glyph_w - margin + 1))
    gy = int(rng.integers(margin, size - glyph_h - margin + 1))
    if side == "left":  # digit goes to the right half
        gx += half
    return Scene(
        size=size,
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        side=side,
        disk_center=(cx, cy),
        disk_radius=radius,
        digit=DIGITS[rng.integers(len(DIGITS))],
        digit_origin=(gx, gy),
        digit_scale=scale,
        ink_alpha=float(rng.uniform(0.55, 1.0)),
    )


def render_scene(scene: Scene) -> Image.Image:
    """Draws the scene as an RGB PIL image (size x size)."""
    size = scene.size
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(image)
    cx, cy = scene.disk_center
    r = scene.disk_radius
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DISK_COLOR)
    array = np.asarray(image).astype(np.float32)
    glyph = np.kron(GLYPHS[scene.digit], np.ones((scene.digit_scale, scene.digit_scale), bool))
    gx, gy = scene.digit_origin
    region = array[gy : gy + glyph.shape[0], gx : gx + glyph.shape[1]]
    # Ink = background darkened toward black by ink_alpha (random strength blurs the ink total).
    region[glyph] = region[glyph] * (1.0 - scene.ink_alpha)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def answer_for(scene: Scene, task: str) -> str:
    """Gradable short answer of `task` ('digit' | 'background' | 'side') for the scene."""
    if task == "digit":
        return scene.digit
    if task == "background":
        return scene.background
    if task == "side":
        return scene.side
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(QUESTIONS)}")


def make_record(seed: int, index: int, size: int = 64, fine_fraction: float = 0.5) -> dict:
    """Record `index` of the task with this seed: {id, images, question, answer, kind, task, scene}."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, size)
    if rng.random() < fine_fraction:
        task = "digit"
    else:
        task = ("background", "side")[int(rng.integers(2))]
    return {
        "id": f"synthetic-{seed}-{index}",
        "images": [render_scene(scene)],
        "question": QUESTIONS[task],
        "answer": answer_for(scene, task),
        "kind": KIND_OF_TASK[task],
        "task": task,
        "scene": scene,
    }


class SyntheticSource:
    """Random-access grain source of `num_records` synthetic records (picklable, no files).

    Args:
      num_records: length of the source.
      seed: task seed; the same (seed, index) always gives the same record.
      image_size: side S of the square images (>= 32).
      fine_fraction: share of records asking the fine (digit) question, in [0, 1].
    """

    def __init__(self, num_records: int = 1024, seed: int = 0, image_size: int = 64, fine_fraction: float = 0.5):
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
        if not 0.0 <= fine_fraction <= 1.0:
            raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction}")
        self.num_records = int(num_records)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.fine_fraction = float(fine_fraction)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        if not -self.num_records <= index < self.num_records:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_records})")
        return make_record(self.seed, int(index) % self.num_records, self.image_size, self.fine_fraction)

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(num_records={self.num_records}, seed={self.seed}, "
            f"image_size={self.image_size}, fine_fraction={self.fine_fraction})"
        )
