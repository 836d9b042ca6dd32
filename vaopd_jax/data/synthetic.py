"""Offline, deterministic vision-critical task for the demo and tests.

Every image (S x S pixels, default 64) shows a big disk on a textured background:
  * the background colour (red / green / blue / yellow)            -> COARSE question
  * the colour of the disk (white / black)                         -> COARSE question
  * the background's 1-pixel texture: horizontal stripes, vertical stripes or a grid
    (checkerboard) of darker ink, at a random ink strength           -> FINE question
Every texture inks exactly half of the background's pixels, so pixelation at ratio 0.1 (S=64 ->
6x6 cells of ~11 px) averages all three into the same flat tint while both colours survive it: the
texture is in the highest spatial frequency an image has, the detail a pixelated view loses first.
tests/test_data_synthetic.py measures it: changing the texture moves the pixelated image by about
half a grey level (the colours move it by tens), and a reader fitted on original images reads the
texture from pixelated ones at chance. (What is left is a faint trace of the stripes' phase along
the image border, which a probe fitted on pixelated images themselves can pick up.) All three cues
cover most of the image, so a tiny Qwen3-VL-shaped model learns to read them on a CPU in minutes.
Answers are single Qwen tokens.

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
DISKS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15)}
PATTERNS = ("horizontal", "vertical", "grid")


def pattern_mask(pattern: str, height: int, width: int) -> np.ndarray:
    """(height, width) bool ink mask of a texture (ink on the even rows / columns / cells)."""
    rows, cols = np.indices((height, width))
    if pattern == "horizontal":
        return rows % 2 == 0
    if pattern == "vertical":
        return cols % 2 == 0
    if pattern == "grid":
        return (rows + cols) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


QUESTIONS = {
    "pattern": "<image>Which texture has the background: horizontal, vertical or grid?",
    "background": "<image>What colour is the background?",
    "disk": "<image>Is the big disk white or black?",
}
KIND_OF_TASK = {"pattern": "fine", "background": "coarse", "disk": "coarse"}
ANSWER_VOCAB = {"pattern": PATTERNS, "background": tuple(BACKGROUNDS), "disk": tuple(DISKS)}


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image (so counterfactual scenes differ in one field)."""

    size: int
    background: str
    pattern: str
    ink_alpha: float  # 0..1, how much the texture's ink darkens the background
    disk: str  # disk colour
    disk_center: tuple[int, int]  # (x, y)
    disk_radius: int


def sample_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """Random scene; the disk lies wholly inside the image."""
    if size < 32:
        raise ValueError(f"synthetic image size must be >= 32 pixels, got {size}")
    radius = max(4, int(round(0.2 * size)))
    cx, cy = (int(rng.integers(radius + 1, size - radius - 1)) for _ in range(2))
    return Scene(
        size=size,
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        ink_alpha=float(rng.uniform(0.4, 0.8)),
        disk=list(DISKS)[rng.integers(len(DISKS))],
        disk_center=(cx, cy),
        disk_radius=radius,
    )


def render_scene(scene: Scene) -> Image.Image:
    """Draws the scene as an RGB PIL image (size x size)."""
    size = scene.size
    array = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.float32), (size, size, 3)).copy()
    array[pattern_mask(scene.pattern, size, size)] *= 1.0 - scene.ink_alpha  # ink darkens
    image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
    cx, cy = scene.disk_center
    r = scene.disk_radius
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=DISKS[scene.disk])
    return image


def answer_for(scene: Scene, task: str) -> str:
    """Gradable short answer of `task` ('pattern' | 'background' | 'disk') for the scene."""
    if task == "pattern":
        return scene.pattern
    if task == "background":
        return scene.background
    if task == "disk":
        return scene.disk
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(QUESTIONS)}")


def make_record(seed: int, index: int, size: int = 64, fine_fraction: float = 0.5) -> dict:
    """Record `index` of the task with this seed: {id, images, question, answer, kind, task, scene}."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, size)
    if rng.random() < fine_fraction:
        task = "pattern"
    else:
        task = ("background", "disk")[int(rng.integers(2))]
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
      fine_fraction: share of records asking the fine (texture) question, in [0, 1].
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
