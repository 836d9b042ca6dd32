"""`PromptBatch`: the typed batch of prompts that crosses from the data pipeline to the sampler and to the
train-batch builder (docs/architecture.md: PromptBatch -> Sampler -> rollouts -> TrainBatch -> the fused step).

It is built in one place, `from_examples` (the pipeline's collate; `from_flat` re-splits the flat pixel rows
of `sampler.generate`'s public API into it), and it already holds everything the consumers would otherwise
re-derive: each prompt's own images padded to a static per-prompt patch bucket (both views), the per-prompt
vision-tower inputs, and the MRoPE position ids and rope deltas, computed once on the host.

    batch = from_examples(featurized, model_config, pad_id=tokenizer.pad_token_id)   # (see the pipeline)
    batch = batch.without_filler()            # drop the filler rows of a final partial batch
    batch = batch.with_view("pixelated")      # the warm-up's view of the images in pixel_values
    batch = batch.gather_processes()          # every process's prompts, identical on every process
    rows = batch.image_rows(num_repeats=4)    # feature rows of the <|image_pad|> tokens of 4 copies per prompt
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from vaopd_jax.models.qwen3_vl import Qwen3VLConfig, VisionInputs, get_rope_index, prepare_vision_inputs

# The image views a PromptBatch can put in `pixel_values` (`with_view`; config `<role>.sft.images`).
VIEWS = ("original", "pixelated", "pixelated_fine")
# Per-field fill of padding beyond a prompt's real patch rows (`VisionInputs`): -1 = no image frame.
_VISION_FILL = {"segment_ids": -1}


class PromptBatch(NamedTuple):
    """P prompts, right-padded to Tp tokens, each with its own images padded to Np patch rows (numpy).

    input_ids (P, Tp) int32: chat prompts, right-padded with the tokenizer's pad id.
    attention_mask (P, Tp) int32: 1 on each prompt's real tokens (a prefix of the row); all 0 on filler rows.
    position_ids (3, P, Tp) int32: MRoPE positions (`qwen3_vl.get_rope_index`); 0 on padding.
    rope_deltas (P,) int32: max position + 1 - prompt length; response token j of a prompt of length L sits at
      L + delta + j on all three axes (`next_positions` + j).
    image_grid_thw (P, Ip, 3) int32: (t, h, w) of each of the prompt's images, in order; zero rows after them
      (Ip: the batch's images-per-prompt bucket, a power of two).
    pixel_values (P, Np, patch_dim) float32 or None: the prompt's patch rows, image after image, then zero rows
      (Np: the per-prompt patch bucket, a multiple of merge^2); None when no prompt has an image.
    pixel_values_pixelated: the pixelated view in the same layout (identical grids); None when no prompt has an
      image or the caller has no pixelated view (the sampler does not use it; the train batch needs it).
    vision_inputs: `qwen3_vl.VisionInputs` of each prompt's images stacked on a leading P axis (fields
      (P, Np, ...) and merged_valid (P, Np / merge^2)); None when pixel_values is None.
    example_mask (P,) bool: False on the filler rows of a final partial batch.
    id, answer, kind (P,) numpy str arrays ('' on filler rows; kind '' when the source has no kinds).
    reply (P,) numpy str array: the taught reply of each prompt when the source has one (the synthetic task;
      the demo's SFT warm-ups learn it), else ''.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    rope_deltas: np.ndarray
    image_grid_thw: np.ndarray
    pixel_values: np.ndarray | None
    pixel_values_pixelated: np.ndarray | None
    vision_inputs: VisionInputs | None
    example_mask: np.ndarray
    id: np.ndarray
    answer: np.ndarray
    kind: np.ndarray
    reply: np.ndarray

    # ------------------------------------------------------------------ derived
    @property
    def num_prompts(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_lengths(self) -> np.ndarray:
        """(P,) int32 real tokens per prompt."""
        return self.attention_mask.sum(1).astype(np.int32)

    @property
    def next_positions(self) -> np.ndarray:
        """(P,) int32 MRoPE position of the first response token (max prompt position + 1)."""
        return (self.prompt_lengths + self.rope_deltas).astype(np.int32)

    @property
    def images_per_prompt(self) -> np.ndarray:
        """(P,) int32."""
        return np.any(self.image_grid_thw != 0, axis=-1).sum(-1).astype(np.int32)

    @property
    def num_patches(self) -> np.ndarray:
        """(P,) int32 real patch rows per prompt (the rest of its Np rows are padding)."""
        return np.prod(self.image_grid_thw.astype(np.int64), axis=-1).sum(-1).astype(np.int32)

    def image_rows(self, num_repeats: int = 1) -> np.ndarray | None:
        """Feature rows for `num_repeats` adjacent copies of each prompt (e.g. its rollouts), (P * R * Mp,) int32.

        The vision tower runs once per prompt, giving features (P, Mp, E); row p * Mp + i is the i-th
        <|image_pad|> token of prompt p. Listed in the row-major order of the <|image_pad|> tokens of the
        repeated rows, then zero-padded: `jnp.take(features.reshape(-1, E), image_rows, axis=0)` is what the
        model scatters into those tokens. None for a text-only batch.
        """
        if self.vision_inputs is None:
            return None
        merged_valid = np.asarray(self.vision_inputs.merged_valid)  # (P, Mp): the first n_p rows are real
        num_prompts, per_prompt = merged_valid.shape
        rows = [p * per_prompt + np.arange(int(merged_valid[p].sum()))
                for p in range(num_prompts) for _ in range(num_repeats)]
        out = np.zeros(num_prompts * num_repeats * per_prompt, np.int32)
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        out[:len(flat)] = flat
        return out

    # ------------------------------------------------------------------ operations
    def select(self, rows) -> "PromptBatch":
        """The batch restricted to `rows` (indices or a (P,) bool mask), every per-prompt field alike."""
        rows = np.asarray(rows)
        take = lambda x: None if x is None else np.asarray(x)[rows]  # noqa: E731
        vision = None if self.vision_inputs is None else VisionInputs(*(take(f) for f in self.vision_inputs))
        return PromptBatch(
            input_ids=take(self.input_ids), attention_mask=take(self.attention_mask),
            position_ids=self.position_ids[:, rows], rope_deltas=take(self.rope_deltas),
            image_grid_thw=take(self.image_grid_thw), pixel_values=take(self.pixel_values),
            pixel_values_pixelated=take(self.pixel_values_pixelated), vision_inputs=vision,
            example_mask=take(self.example_mask), id=take(self.id), answer=take(self.answer), kind=take(self.kind),
            reply=take(self.reply))

    def without_filler(self) -> "PromptBatch":
        """The real prompts only (drops the filler rows of a final partial batch, `example_mask` False)."""
        return self if self.example_mask.all() else self.select(self.example_mask)

    def with_view(self, view: str) -> "PromptBatch":
        """The batch with the chosen view of each image in `pixel_values`.

        view: 'original'; 'pixelated' (every image); 'pixelated_fine' (the images of fine-detail questions,
        kind 'fine', pixelated and the others original: a student that sees colours and shapes but never the
        fine detail, the situation VA-OPD is made for).
        """
        if view not in VIEWS:
            raise ValueError(f"unknown image view {view!r}; expected one of {VIEWS}")
        if view == "original" or self.pixel_values is None:
            return self
        if self.pixel_values_pixelated is None:
            raise ValueError(f"image view {view!r} needs pixel_values_pixelated, which this batch does not hold")
        if view == "pixelated":
            return self._replace(pixel_values=self.pixel_values_pixelated)
        fine = (np.asarray(self.kind) == "fine")[:, None, None]
        return self._replace(pixel_values=np.where(fine, self.pixel_values_pixelated, self.pixel_values))

    def gather_processes(self) -> "PromptBatch":
        """Every process's prompts in process order, identical on every process (multi-host training).

        Token, position and pixel arrays are padded to the widest process's buckets (prompt length, patches and
        images per prompt) with their padding values, so the result is a valid PromptBatch with static shapes.
        Every process's batch holds images, or none does (the pipeline skips records without an image).
        """
        import jax

        if jax.process_count() == 1:
            return self
        from vaopd_jax.parallel import multihost

        fields = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "position_ids": np.moveaxis(self.position_ids, 1, 0), "rope_deltas": self.rope_deltas,
                  "image_grid_thw": self.image_grid_thw, "example_mask": self.example_mask}
        fills = {}
        if self.pixel_values is not None:
            fields["pixel_values"] = self.pixel_values
            if self.pixel_values_pixelated is not None:
                fields["pixel_values_pixelated"] = self.pixel_values_pixelated
            for name, value in self.vision_inputs._asdict().items():
                fields[f"vision.{name}"] = value
                fills[f"vision.{name}"] = _VISION_FILL.get(name, 0)
        out = multihost.allgather_rows(fields, fills)
        vision = None
        if self.vision_inputs is not None:
            vision = VisionInputs(**{name: out[f"vision.{name}"] for name in VisionInputs._fields})
        strings = {k: multihost.allgather_strings(getattr(self, k)) for k in ("id", "answer", "kind", "reply")}
        return PromptBatch(
            input_ids=out["input_ids"], attention_mask=out["attention_mask"],
            position_ids=np.moveaxis(out["position_ids"], 0, 1), rope_deltas=out["rope_deltas"],
            image_grid_thw=out["image_grid_thw"], pixel_values=out.get("pixel_values"),
            pixel_values_pixelated=out.get("pixel_values_pixelated"), vision_inputs=vision,
            example_mask=out["example_mask"], **strings)


# ----------------------------------------------------------------------------- building
def _power_of_two(n: int, minimum: int = 1) -> int:
    n = max(int(n), int(minimum))
    return 1 << (n - 1).bit_length()


def from_examples(examples: Sequence[Mapping], cfg: Qwen3VLConfig, *, pad_id: int, batch_size: int | None = None,
                  prompt_len: int | None = None, patches_per_prompt: int | None = None) -> PromptBatch:
    """The one builder of a PromptBatch, from featurized examples (the pipeline's `Featurize` output).

    Args:
      examples: per prompt a mapping with 'input_ids' (T,) int, 'image_grid_thw' (n, 3) int (n may be 0),
        'pixel_values' (sum t*h*w, patch_dim) float32 (or None when n = 0), optionally
        'pixel_values_pixelated' (same shape), and optionally 'id', 'answer', 'kind', 'reply' strings.
      cfg: the model config (special token ids, merge size, vision position grid).
      pad_id: token id of the right padding.
      batch_size: P >= len(examples); the rows after the examples are filler (`example_mask` False).
      prompt_len: static Tp >= the longest prompt (default: the longest prompt).
      patches_per_prompt: static Np, a multiple of merge^2 >= the largest prompt's patch rows (default: that
        count rounded up to a power of two).
    Raises:
      ValueError naming the prompt when its <|image_pad|> runs, grids and pixel rows disagree.
    """
    num_real = len(examples)
    if num_real == 0:
        raise ValueError("a PromptBatch needs at least one prompt")
    batch_size = num_real if batch_size is None else int(batch_size)
    if batch_size < num_real:
        raise ValueError(f"batch_size={batch_size} < {num_real} examples")
    lengths = [len(e["input_ids"]) for e in examples]
    prompt_len = max(lengths) if prompt_len is None else int(prompt_len)
    if prompt_len < max(lengths):
        raise ValueError(f"prompt_len={prompt_len} is shorter than the longest prompt ({max(lengths)} tokens)")

    input_ids = np.full((batch_size, prompt_len), pad_id, np.int32)
    attention_mask = np.zeros((batch_size, prompt_len), np.int32)
    for b, e in enumerate(examples):
        input_ids[b, :lengths[b]] = e["input_ids"]
        attention_mask[b, :lengths[b]] = 1

    grids = [np.asarray(e.get("image_grid_thw", np.zeros((0, 3))), np.int64).reshape(-1, 3) for e in examples]
    counts = [int(np.prod(g, axis=1).sum()) for g in grids]
    has_pixelated = all(e.get("pixel_values_pixelated") is not None for e, n in zip(examples, counts) if n)
    for b, (e, n) in enumerate(zip(examples, counts)):
        rows = 0 if e.get("pixel_values") is None else len(e["pixel_values"])
        if rows != n:
            raise ValueError(f"prompt {b}: pixel_values has {rows} rows but its image_grid_thw "
                             f"{grids[b].tolist()} needs {n} (sum of t*h*w)")
    # MRoPE positions once, for the whole batch (images in order over the flattened batch); get_rope_index
    # also checks that each <|image_pad|> run matches its image's grid.
    all_grids = np.concatenate(grids) if any(len(g) for g in grids) else None
    position_ids, rope_deltas = get_rope_index(input_ids, all_grids, attention_mask, cfg)

    max_images = _power_of_two(max(len(g) for g in grids))
    image_grid_thw = np.zeros((batch_size, max_images, 3), np.int32)
    for b, g in enumerate(grids):
        image_grid_thw[b, :len(g)] = g

    pixel_values = pixel_values_pix = vision_inputs = None
    if max(counts) > 0:
        merge_unit = cfg.vision.merge_unit
        if patches_per_prompt is None:
            patches_per_prompt = -(-_power_of_two(max(counts), merge_unit) // merge_unit) * merge_unit
        if patches_per_prompt < max(counts) or patches_per_prompt % merge_unit:
            raise ValueError(f"patches_per_prompt={patches_per_prompt} must be >= the largest prompt's patch count "
                             f"{max(counts)} and a multiple of {merge_unit}")
        dim = cfg.vision.patch_dim
        pixel_values = np.zeros((batch_size, patches_per_prompt, dim), np.float32)
        pixel_values_pix = np.zeros_like(pixel_values) if has_pixelated else None
        vision = []
        for b in range(batch_size):
            if b < num_real and counts[b]:
                pixel_values[b, :counts[b]] = examples[b]["pixel_values"]
                if pixel_values_pix is not None:
                    pixel_values_pix[b, :counts[b]] = examples[b]["pixel_values_pixelated"]
            vision.append(prepare_vision_inputs(grids[b] if b < num_real else np.zeros((0, 3)), cfg,
                                                pad_patches_to=patches_per_prompt))
        vision_inputs = VisionInputs(*(np.stack(field) for field in zip(*vision)))

    def strings(key):
        return np.array([str(e.get(key, "")) for e in examples] + [""] * (batch_size - num_real), dtype=np.str_)

    return PromptBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, rope_deltas=rope_deltas,
        image_grid_thw=image_grid_thw, pixel_values=pixel_values, pixel_values_pixelated=pixel_values_pix,
        vision_inputs=vision_inputs, example_mask=np.arange(batch_size) < num_real, id=strings("id"),
        answer=strings("answer"), kind=strings("kind"), reply=strings("reply"))


def _image_runs(ids: np.ndarray, image_token_id: int) -> list[int]:
    """Lengths of the maximal <|image_pad|> runs of one prompt (one run = one image)."""
    is_img = np.concatenate([[False], ids == image_token_id, [False]])
    starts = np.nonzero(~is_img[:-1] & is_img[1:])[0]
    ends = np.nonzero(is_img[:-1] & ~is_img[1:])[0]
    return list(ends - starts)


def from_flat(input_ids, attention_mask, pixel_values, image_grid_thw, cfg: Qwen3VLConfig, *,
              pixel_values_pixelated=None, pad_id: int = 0, prompt_len: int | None = None,
              patches_per_prompt: int | None = None, **strings) -> PromptBatch:
    """A PromptBatch from the model's flat image layout (`model(input_ids, attention_mask, pixel_values,
    image_grid_thw)`, `sampler.generate`): pixel rows (N, patch_dim) of all images in order over the batch,
    image_grid_thw (n_images, 3), both None for text only. Each prompt takes as many images as it holds
    <|image_pad|> runs. Prompts are right-padded (B, T); `prompt_len` re-pads them (default: the longest real
    prompt). `strings`: optional id / answer / kind sequences."""
    input_ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    lengths = mask.sum(1)
    n_img_tokens = int((input_ids[mask] == cfg.image_token_id).sum())
    if pixel_values is None and image_grid_thw is None:
        if n_img_tokens:
            raise ValueError(f"the prompts hold {n_img_tokens} <|image_pad|> tokens (id {cfg.image_token_id}) "
                             "but no pixel_values / image_grid_thw were given")
        grids = np.zeros((0, 3), np.int64)
    elif pixel_values is None or image_grid_thw is None:
        raise ValueError("pass pixel_values and image_grid_thw together (one of them is None)")
    else:
        grids = np.asarray(image_grid_thw, np.int64)
        if grids.ndim != 2 or grids.shape[1] != 3 or grids.shape[0] == 0:
            raise ValueError(f"image_grid_thw must be (n_images, 3) with n_images >= 1; got shape {grids.shape}")
        rows = int(np.prod(grids, axis=1).sum())
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.ndim != 2 or pixel_values.shape != (rows, cfg.vision.patch_dim):
            raise ValueError(f"pixel_values shape {pixel_values.shape} does not match image_grid_thw: expected "
                             f"({rows}, {cfg.vision.patch_dim}) = (sum of t*h*w, patch_dim)")
        merged = rows // cfg.vision.merge_unit
        if n_img_tokens != merged:
            raise ValueError(f"the prompts hold {n_img_tokens} <|image_pad|> tokens but image_grid_thw has "
                             f"{merged} merged patches (sum of t*h*w / {cfg.vision.merge_unit}); they must be equal")
    patches = np.prod(grids, axis=1)
    examples, image, row = [], 0, 0
    for p in range(input_ids.shape[0]):
        runs = _image_runs(input_ids[p, :lengths[p]], cfg.image_token_id)
        own = grids[image:image + len(runs)]
        needed = patches[image:image + len(runs)] // cfg.vision.merge_unit
        if len(own) != len(runs) or not np.array_equal(needed, runs):
            raise ValueError(f"prompt {p}: <|image_pad|> runs {runs} do not match image_grid_thw rows {own.tolist()}")
        n = int(patches[image:image + len(runs)].sum())
        example = {"input_ids": input_ids[p, :lengths[p]], "image_grid_thw": own,
                   "pixel_values": pixel_values[row:row + n] if n else None,
                   "pixel_values_pixelated": (np.asarray(pixel_values_pixelated, np.float32)[row:row + n]
                                              if n and pixel_values_pixelated is not None else None)}
        example.update({key: values[p] for key, values in strings.items()})
        examples.append(example)
        image, row = image + len(runs), row + n
    return from_examples(examples, cfg, pad_id=pad_id, prompt_len=prompt_len, patches_per_prompt=patches_per_prompt)
