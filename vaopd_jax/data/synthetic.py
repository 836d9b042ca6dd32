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
# The auxiliary question (kind 'aux', never validated): the texture again, in other words. A student warm-up
# that asks it on the original images trains the student's vision to resolve the texture, while its replies to
# the fine question never name the texture (config student.sft.aux_fraction; see the module docstring).
AUX_TASK = "lines"
AUX_QUESTION = "<image>Up close, do the thin lines of the background form bands, bars or checks?"
AUX_WORDS = {"horizontal": "bands", "vertical": "bars", "grid": "checks"}


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
    """Gradable short answer of `task` ('pattern' | 'background' | 'disk' | 'lines') for the scene."""
    if task == "pattern":
        return scene.pattern
    if task == "background":
        return scene.background
    if task == "disk":
        return scene.disk
    if task == AUX_TASK:
        return AUX_WORDS[scene.pattern]
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(TASKS)}")


TASKS = (*QUESTIONS, AUX_TASK)


def question_for(task: str) -> str:
    """The prompt text of `task`."""
    if task == AUX_TASK:
        return AUX_QUESTION
    if task not in QUESTIONS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(TASKS)}")
    return QUESTIONS[task]


def kind_of(task: str) -> str:
    """'fine' | 'coarse' | 'aux' (the auxiliary texture question of the student's warm-up)."""
    return "aux" if task == AUX_TASK else KIND_OF_TASK[task]


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
REPLY_TOKENS = (20, 60)  # every natural reply has between 20 and 60 tokens (<|im_end|> included)
# The auxiliary question's reply: the fine reply's reasoning sentence up to the detail word, with the auxiliary
# word there, then the answer. The student reads the texture in the very sentence where its fine replies will
# need it, so what it sees is in its hidden state at the detail word; only the mapping to the words is missing.
AUX_REASON = ("Up close, the thin dark lines form {aux}.", "Looking closely, the fine lines make {aux}.",
              "The thin lines form {aux} when seen closely.")
AUX_SCAFFOLD = "The lines form {aux}."

# ---- scaffold replies (reply style 'scaffold'): a filler of exactly n language tokens, then a short core.
# Each slot is one sentence of exactly SCAFFOLD_UNIT tokens (at the start of a reply or after a space, Qwen's
# pre-tokenizer splits there), so `scaffold_tokens` = n gives n / SCAFFOLD_UNIT slots, in this order, each
# phrased by one of its four variants. A phrasing mismatch (`mismatch` > 0) teaches the teacher and the student
# disjoint halves of the variants of some slots: variants 0-1 for the teacher, 2-3 for the student.
SCAFFOLD_UNIT = 4
SCAFFOLD_SLOTS = (
    ("Let me look.", "First I look.", "Here we go.", "I will check."),
    ("See the image.", "Read the image.", "Study the image.", "Look at it."),
    ("The image helps.", "The picture helps.", "The view helps.", "The scene helps."),
    ("Step by step.", "Bit by bit.", "Part by part.", "Piece by piece."),
    ("I take care.", "I stay calm.", "I go slow.", "I look again."),
    ("Think it through.", "Work it out.", "Sort it out.", "Figure it out."),
    ("This is clear.", "That is fine.", "It is simple.", "All is well."),
    ("No doubt here.", "No problem here.", "No issue here.", "Nothing odd here."),
    ("Good so far.", "Fine so far.", "Right so far.", "It looks fine."),
    ("I keep going.", "We keep going.", "I move on.", "We move on."),
    ("One more step.", "Another step now.", "Next step now.", "Last step now."),
    ("Now I check.", "I check it.", "I read it.", "Then I think."),
    ("I am sure.", "I can tell.", "We can see.", "You can see."),
    ("It seems so.", "This seems right.", "That seems true.", "So I decide."),
)
MAX_SCAFFOLD_TOKENS = SCAFFOLD_UNIT * len(SCAFFOLD_SLOTS)
# The core after the filler: what survives pixelation (both colours, in every reply, as the natural replies'
# description: a disk question asked in a quarter of the replies alone was not learnt in 120 SFT steps), the
# fine-detail token, then the answer. Fine: 14 tokens, 15 with <|im_end|>; coarse: 9 and 10.
SCAFFOLD_DESCRIBE = "A {disk} disk on {background}."
SCAFFOLD_CORE = {"pattern": "The lines form {detail}. Answer: {pattern}",
                 "background": "Answer: {background}",
                 "disk": "Answer: {disk}"}
REPLY_STYLES = ("natural", "scaffold")
PHRASINGS = ("all", "teacher", "student")


def mismatched_slots(num_slots: int, mismatch: float) -> tuple[int, ...]:
    """The slots (of the first `num_slots`) whose phrasing differs between teacher and student: a share
    `mismatch` of them, spread evenly (slot i when floor((i + 1) m) > floor(i m))."""
    if not 0.0 <= mismatch <= 1.0:
        raise ValueError(f"phrasing mismatch must be in [0, 1], got {mismatch}")
    return tuple(i for i in range(num_slots) if int((i + 1) * mismatch + 1e-9) > int(i * mismatch + 1e-9))


def scaffold_text(num_tokens: int, rng: np.random.Generator, phrasing: str = "all", mismatch: float = 0.0) -> str:
    """The filler of a scaffold reply: `num_tokens` / SCAFFOLD_UNIT sentences, one per slot in order.

    phrasing 'all' draws every slot's phrasing from its four variants; 'teacher' / 'student' (the warm-ups) draw
    the mismatched slots (`mismatched_slots`) from that role's half only."""
    if num_tokens % SCAFFOLD_UNIT or not 0 <= num_tokens <= MAX_SCAFFOLD_TOKENS:
        raise ValueError(f"scaffold tokens must be a multiple of {SCAFFOLD_UNIT} in [0, {MAX_SCAFFOLD_TOKENS}], "
                         f"got {num_tokens}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    slots = num_tokens // SCAFFOLD_UNIT
    split = set(mismatched_slots(slots, mismatch)) if phrasing != "all" else set()
    words = []
    for i in range(slots):
        variants = SCAFFOLD_SLOTS[i]
        if i in split:
            variants = variants[:2] if phrasing == "teacher" else variants[2:]
        words.append(variants[int(rng.integers(len(variants)))])
    return " ".join(words)


def make_reply(scene: Scene, task: str, rng: np.random.Generator, *, style: str = "natural",
               scaffold_tokens: int = 0, phrasing: str = "all", mismatch: float = 0.0) -> str:
    """The taught reply to `task` about `scene`, its phrasing drawn with `rng` (see the module docstring).

    style 'natural': restatement, description, reasoning, answer (20-60 tokens); 'scaffold': `scaffold_tokens`
    filler tokens (`scaffold_text`, phrased for `phrasing` with a `mismatch` share of split slots), then the
    description of the colours (`SCAFFOLD_DESCRIBE`) and the core (`SCAFFOLD_CORE`). The auxiliary question's reply is the fine reply's reasoning sentence with the
    auxiliary word in the detail word's place (`AUX_REASON`, `AUX_SCAFFOLD`), then its answer."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(TASKS)}")
    if style not in REPLY_STYLES:
        raise ValueError(f"reply style must be one of {REPLY_STYLES}, got {style!r}")
    words = {"disk": scene.disk, "background": scene.background, "pattern": scene.pattern,
             "detail": DETAIL_WORDS[scene.pattern]}
    if task == AUX_TASK:
        aux = answer_for(scene, task)
        if style == "scaffold":
            return f"{SCAFFOLD_DESCRIBE.format(**words)} {AUX_SCAFFOLD.format(aux=aux)} {FINAL.format(answer=aux)}"
        return f"{AUX_REASON[int(rng.integers(len(AUX_REASON)))].format(aux=aux)} {FINAL.format(answer=aux)}"
    if style == "scaffold":
        filler = scaffold_text(scaffold_tokens, rng, phrasing, mismatch)
        core = (SCAFFOLD_DESCRIBE.format(**words), SCAFFOLD_CORE[task].format(**words))
        return " ".join(part for part in (filler, *core) if part)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    parts = [pick(RESTATE[task]), pick(DESCRIBE).format(**words)]
    if task == "pattern":
        parts.append(pick(REMARK))
    parts += [pick(REASON[task]).format(**words), FINAL.format(answer=answer_for(scene, task))]
    return " ".join(part for part in parts if part)


def task_texts(tokenizer) -> list[str]:
    """Every text the task can show a model: the chat prompts (template rendered, one image) and every
    sentence a reply can hold, alone and after a space (Qwen's pre-tokenizer splits at both, so these hold
    every token of every prompt and reply, in either reply style)."""
    from vaopd_jax.data import processor

    prompts = [tokenizer.apply_chat_template(processor.build_messages(question_for(t), 1), tokenize=False,
                                             add_generation_prompt=True) for t in TASKS]
    words = [{"disk": d, "background": b, "pattern": p, "detail": DETAIL_WORDS[p], "answer": a, "aux": AUX_WORDS[p]}
             for d in DISKS for b in BACKGROUNDS for p in PATTERNS
             for a in (*PATTERNS, *BACKGROUNDS, *DISKS, *AUX_WORDS.values())]
    templates = {t for options in (*RESTATE.values(), DESCRIBE, *REASON.values(), REMARK, *SCAFFOLD_SLOTS,
                                   AUX_REASON) for t in options if t}
    templates |= {FINAL, AUX_SCAFFOLD, SCAFFOLD_DESCRIBE, *SCAFFOLD_CORE.values()}
    sentences = sorted({t.format(**w) for t in templates for w in words})
    return prompts + sentences + [" " + s for s in sentences]


def task_signature() -> str:
    """A short hash of every text the task can show (questions, reply templates, answer words) and of its colours:
    models taught on the task (the study's cached warm-ups) are reused only while it is unchanged."""
    import hashlib
    import json

    texts = [QUESTIONS, AUX_QUESTION, AUX_WORDS, DETAIL_WORDS, RESTATE, DESCRIBE, REASON, REMARK, FINAL, AUX_REASON,
             AUX_SCAFFOLD, SCAFFOLD_DESCRIBE, SCAFFOLD_SLOTS, SCAFFOLD_CORE, BACKGROUNDS, DISKS, PATTERNS]
    return hashlib.sha1(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:10]


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
    """Ids of every reply word that depends on the image: the colours (which survive pixelation), the
    fine-detail words (`critical_token_ids`, which do not) and the auxiliary question's answers (`AUX_WORDS`), as
    they appear after a space. The demo's SFT
    warm-ups weigh them up (`<role>.sft.image_word_weight`): a few words of a ~40-token reply."""
    words = (*BACKGROUNDS, *DISKS, *AUX_WORDS.values())
    ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every colour and auxiliary answer word should be one token; got {dict(zip(words, ids))}")
    return tuple(sorted({i[0] for i in ids} | set(critical_token_ids(tokenizer))))


def reply_token_info(tokenizer, reply: str, task: str) -> dict:
    """Token ids of a taught reply (``<|im_end|>`` appended) and where its vision-critical tokens are.

    Returns:
      {"ids": list[int], "critical": positions of the tokens that depend on the fine detail before the answer
       (fine question: the detail word, and in a natural reply the texture concluded from it; other questions:
       none), "answer": positions of the final answer's tokens}.
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
        # The detail word always precedes the answer; a natural reply also names the texture it concludes.
        for words, needed in ((tuple(DETAIL_WORDS.values()), True), (PATTERNS, False)):
            found = list(re.finditer(r"\b(" + "|".join(words) + r")\b", body))
            if len(found) > 1 or (needed and not found):
                raise ValueError(f"reply should name exactly one of {words} before the answer: {reply!r}")
            critical += [j for match in found for j in covering(match.start(), match.end())]
    return {"ids": ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")], "critical": sorted(critical),
            "answer": answer}


@dataclasses.dataclass(frozen=True)
class Replies:
    """How a source's taught replies are written (`make_reply`).

    style: 'natural' (20-60 tokens) or 'scaffold' (`scaffold_tokens` filler tokens + a 15-token core);
    scaffold_tokens: a multiple of SCAFFOLD_UNIT in [0, MAX_SCAFFOLD_TOKENS] (scaffold style);
    phrasing: 'all', 'teacher' or 'student': whose half of the mismatched slots' variants the filler uses;
    mismatch: share of the filler's slots phrased differently by teacher and student, in [0, 1];
    texture_label_rate: share of the fine-question replies that name the image's texture (detail word,
      conclusion and answer alike); the others name a texture drawn uniformly from the three, so a model taught
      them puts r + (1 - r) / 3 on the right words: a reply that relies on what it sees only in part.
    """

    style: str = "natural"
    scaffold_tokens: int = 0
    phrasing: str = "all"
    mismatch: float = 0.0
    texture_label_rate: float = 1.0

    def __post_init__(self):
        if self.style not in REPLY_STYLES:
            raise ValueError(f"reply style must be one of {REPLY_STYLES}, got {self.style!r}")
        if self.scaffold_tokens % SCAFFOLD_UNIT or not 0 <= self.scaffold_tokens <= MAX_SCAFFOLD_TOKENS:
            raise ValueError(f"scaffold tokens must be a multiple of {SCAFFOLD_UNIT} in [0, {MAX_SCAFFOLD_TOKENS}],"
                             f" got {self.scaffold_tokens}")
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {self.phrasing!r}")
        if not 0.0 <= self.mismatch <= 1.0:
            raise ValueError(f"phrasing mismatch must be in [0, 1], got {self.mismatch}")
        if not 0.0 <= self.texture_label_rate <= 1.0:
            raise ValueError(f"texture_label_rate must be in [0, 1], got {self.texture_label_rate}")


def make_record(seed: int, index: int, size: int = 64, fine_fraction: float = 0.5, aux_fraction: float = 0.0,
                replies: Replies = Replies()) -> dict:
    """Record `index` of the task with this seed: {id, images, question, answer, reply, kind, task, scene}.

    A share `fine_fraction` asks the fine question, `aux_fraction` the auxiliary one, the rest a coarse one."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, size)
    draw = rng.random()
    if draw < fine_fraction:
        task = "pattern"
    elif draw < fine_fraction + aux_fraction:
        task = AUX_TASK
    else:
        task = ("background", "disk")[int(rng.integers(2))]
    told = scene  # the scene the reply describes: a fine reply names a random texture at 1 - texture_label_rate
    if task == "pattern" and replies.texture_label_rate < 1.0:
        label_rng = np.random.default_rng([seed, index, 2])
        if label_rng.random() >= replies.texture_label_rate:
            told = dataclasses.replace(scene, pattern=PATTERNS[int(label_rng.integers(len(PATTERNS)))])
    reply = make_reply(told, task, np.random.default_rng([seed, index, 1]), style=replies.style,
                       scaffold_tokens=replies.scaffold_tokens, phrasing=replies.phrasing, mismatch=replies.mismatch)
    return {
        "id": f"synthetic-{seed}-{index}",
        "images": [render_scene(scene)],
        "question": question_for(task),
        "answer": answer_for(scene, task),
        "reply": reply,
        "kind": kind_of(task),
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
      aux_fraction: share asking the auxiliary texture question (kind 'aux'), in [0, 1 - fine_fraction].
      replies: how the taught replies are written (`Replies`).
    """

    def __init__(self, num_records: int = 1024, seed: int = 0, image_size: int = 64, fine_fraction: float = 0.5,
                 aux_fraction: float = 0.0, replies: Replies = Replies()):
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
        if not 0.0 <= fine_fraction <= 1.0:
            raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction}")
        if not 0.0 <= aux_fraction <= 1.0 - fine_fraction + 1e-9:
            raise ValueError(f"aux_fraction must be in [0, 1 - fine_fraction = {1 - fine_fraction:g}], "
                             f"got {aux_fraction}")
        self.num_records = int(num_records)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.fine_fraction = float(fine_fraction)
        self.aux_fraction = float(aux_fraction)
        self.replies = replies

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        if not -self.num_records <= index < self.num_records:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_records})")
        return make_record(self.seed, int(index) % self.num_records, self.image_size, self.fine_fraction,
                           self.aux_fraction, self.replies)

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(num_records={self.num_records}, seed={self.seed}, "
            f"image_size={self.image_size}, fine_fraction={self.fine_fraction}, aux_fraction={self.aux_fraction}, "
            f"replies={self.replies})"
        )


def source_from_config(config, split: str, seed: int) -> SyntheticSource:
    """The synthetic source of a split ('train' | 'val' | 'teacher_sft' | 'student_sft') from the training config.

    Size: eval.num_problems (val), else data.synthetic_train_size. Question mix: data.synthetic_fine_fraction
    (train), half fine (val), <role>.sft.fine_fraction and <role>.sft.aux_fraction (the warm-ups, whose fine
    replies name the image's texture at <role>.sft.texture_label_rate). Replies:
    data.synthetic_reply_style, data.synthetic_scaffold_tokens and data.synthetic_phrasing_mismatch, each
    warm-up phrased as its role (the trainer never reads the train and val replies)."""
    d = config.data
    size = config.eval.num_problems if split == "val" else d.synthetic_train_size
    role = split[:-len("_sft")] if split.endswith("_sft") else None
    sft = getattr(config, role).sft if role else None  # the typed config (config.Config)
    fine_fraction = {"train": d.synthetic_fine_fraction, "val": 0.5}.get(split, sft and sft.fine_fraction)
    replies = Replies(style=d.synthetic_reply_style, scaffold_tokens=d.synthetic_scaffold_tokens,
                      phrasing=role or "all", mismatch=d.synthetic_phrasing_mismatch,
                      texture_label_rate=sft.texture_label_rate if sft else 1.0)
    return SyntheticSource(size, seed=seed, image_size=d.image_size, fine_fraction=fine_fraction,
                           aux_fraction=sft.aux_fraction if sft else 0.0, replies=replies)
