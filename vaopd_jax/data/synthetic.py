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

Taught replies (`make_reply`, the record's "reply") look like the paper's: 20-60 tokens of language
scaffolding around a short answer. A reply restates the question, describes what survives pixelation (the
colours), takes one reasoning step and ends with ``Answer: <answer>``; each part is drawn from several
phrasings, so the scaffolding is not trivially predictable. In a fine-question reply exactly two tokens depend
on the fine detail (the texture seen up close, "rows" / "columns" / "squares", and the conclusion drawn from
it, "horizontal" / "vertical" / "grid"), then the final answer repeats the conclusion:

    The question asks which texture the background has. I see a black disk on a red background. Up close,
    the thin dark lines form rows, so the texture is horizontal. Answer: horizontal

`reply_token_info` tokenizes a reply and gives the positions of those critical tokens and of the answer. A
teacher that reads the texture puts its visual advantage on the first critical token (the pixelated view
cannot tell the three textures apart there); the conclusion and the answer follow from the text before them.

Records are generated on the fly from (seed, index): `SyntheticSource` is a picklable random-access
source for grain, as cheap to shard and shuffle as a file source.
"""

from __future__ import annotations

import dataclasses
import re

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


# ----------------------------------------------------------------------------- taught replies
# What the thin lines look like up close (the fine-detail token) and the texture it means.
DETAIL_WORDS = {"horizontal": "rows", "vertical": "columns", "grid": "squares"}
RESTATE = {
    "pattern": ("The question asks which texture the background has.", "We need the texture of the background.",
                "I am asked about the fine texture behind the disk.", "This asks for the pattern of the background."),
    "background": ("The question asks for the colour of the background.", "We need the background colour.",
                   "I am asked what colour lies behind the disk.", "This asks which colour the background is."),
    "disk": ("The question asks whether the big disk is white or black.", "We need the colour of the big disk.",
             "I am asked about the shade of the disk.", "This asks which colour the disk is."),
}
# What survives pixelation: both colours ({disk}, {background}).
DESCRIBE = ("I see a {disk} disk on a {background} background.", "The image shows a big {disk} disk over a "
            "{background} field.", "There is a {disk} circle in front of a {background} background.",
            "A {background} background surrounds a {disk} disk.")
# The reasoning step. Fine: {detail} is the fine-detail token, {pattern} the conclusion drawn from it.
REASON = {
    "pattern": ("Up close, the thin dark lines form {detail}, so the texture is {pattern}.",
                "Looking closely, the fine lines make {detail}, which means the texture is {pattern}.",
                "The thin lines form {detail} when seen closely, so the pattern is {pattern}."),
    "background": ("So the background is {background}.", "That colour fills the background, so it is {background}.",
                   "The background is clearly {background}."),
    "disk": ("So the disk is {disk}.", "The disk in the middle looks {disk}.", "Its colour is clearly {disk}."),
}
# An optional remark (language only) before the fine reasoning step.
REMARK = ("", "The colours would survive a blur, but the texture would not.", "A blur would keep the colours only.")
FINAL = "Answer: {answer}"
REPLY_TOKENS = (20, 60)  # every taught reply has between 20 and 60 tokens (<|im_end|> included)


def make_reply(scene: Scene, task: str, rng: np.random.Generator) -> str:
    """The taught reply to `task` about `scene`, its phrasing drawn with `rng` (see the module docstring)."""
    if task not in QUESTIONS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(QUESTIONS)}")
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    words = {"disk": scene.disk, "background": scene.background, "pattern": scene.pattern,
             "detail": DETAIL_WORDS[scene.pattern]}
    parts = [pick(RESTATE[task]), pick(DESCRIBE).format(**words)]
    if task == "pattern":
        parts.append(pick(REMARK))
    parts += [pick(REASON[task]).format(**words), FINAL.format(answer=answer_for(scene, task))]
    return " ".join(part for part in parts if part)


def task_texts(tokenizer) -> list[str]:
    """Every text the task can show a model: the chat prompts (template rendered, one image) and every
    sentence a reply can hold, alone and after a space (Qwen's pre-tokenizer splits at both, so these hold
    every token of every prompt and reply)."""
    from vaopd_jax.data import processor

    prompts = [tokenizer.apply_chat_template(processor.build_messages(q, 1), tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS.values()]
    words = [{"disk": d, "background": b, "pattern": p, "detail": DETAIL_WORDS[p], "answer": a}
             for d in DISKS for b in BACKGROUNDS for p in PATTERNS
             for a in (*PATTERNS, *BACKGROUNDS, *DISKS)]
    templates = {t for options in (*RESTATE.values(), DESCRIBE, *REASON.values(), REMARK) for t in options if t}
    sentences = sorted({t.format(**w) for t in templates | {FINAL} for w in words})
    return prompts + sentences + [" " + s for s in sentences]


def task_tokenizer(base):
    """The Qwen tokenizer restricted to this task's tokens (`tokenizer.TaskVocabTokenizer`, a few hundred ids):
    the demo's tiny models use it (config data.task_vocabulary)."""
    from vaopd_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.task_vocab_tokenizer(base, task_texts(base))


def critical_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the fine-detail words of the replies (" rows", " columns", " squares", " horizontal", " vertical",
    " grid", as they appear after a space): the tokens a teacher's visual advantage should sit on."""
    words = (*DETAIL_WORDS.values(), *PATTERNS)
    ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every fine-detail word should be one token; got {dict(zip(words, ids))}")
    return tuple(sorted(i[0] for i in ids))


def image_word_ids(tokenizer) -> tuple[int, ...]:
    """Ids of every reply word that depends on the image: the colours (which survive pixelation) and the
    fine-detail words (`critical_token_ids`, which do not), as they appear after a space. The demo's SFT
    warm-ups weigh them up (`<role>.sft.image_word_weight`): a few words of a ~40-token reply."""
    words = (*BACKGROUNDS, *DISKS)
    ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every colour word should be one token; got {dict(zip(words, ids))}")
    return tuple(sorted({i[0] for i in ids} | set(critical_token_ids(tokenizer))))


def reply_token_info(tokenizer, reply: str, task: str) -> dict:
    """Token ids of a taught reply (``<|im_end|>`` appended) and where its vision-critical tokens are.

    Returns:
      {"ids": list[int], "critical": positions of the tokens that depend on the fine detail (fine question:
       the detail word and the texture concluded from it; coarse question: none), "answer": positions of the
       final answer's tokens}.
    Raises:
      ValueError when the reply does not end with ``Answer: <answer>`` or lacks its fine-detail words.
    """
    encoded = tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    final = reply.rfind("Answer: ")
    if final < 0:
        raise ValueError(f"reply has no final 'Answer: ...': {reply!r}")

    def covering(start: int, end: int) -> list[int]:
        return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]

    answer_start = final + len("Answer: ")
    answer = covering(answer_start, len(reply))
    critical = []
    if task == "pattern":
        body = reply[:final]
        for words in (tuple(DETAIL_WORDS.values()), PATTERNS):
            found = list(re.finditer(r"\b(" + "|".join(words) + r")\b", body))
            if len(found) != 1:
                raise ValueError(f"reply should name exactly one of {words} before the answer: {reply!r}")
            critical += covering(found[0].start(), found[0].end())
    return {"ids": ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")], "critical": sorted(critical),
            "answer": answer}


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
        "reply": make_reply(scene, task, np.random.default_rng([seed, index, 1])),
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
