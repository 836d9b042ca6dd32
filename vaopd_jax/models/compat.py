"""Whether a teacher and a student can be distilled into each other: checked once both are loaded, before any
compute, with every difference named.

    compat.check_pair(student.config, teacher.config, tokenizer=tokenizer, teacher_path=config.teacher.hf_path)

The two models read one batch: one tokenizer's token ids, one processor's pixel rows, one set of MRoPE
position ids and vision-tower inputs (all computed once, from the student's config, by the pipeline), and the
token KL (Eq. 1) compares their distributions over one vocabulary. So every config field those depend on must
agree (`SHARED_FIELDS`), and a teacher directory that ships its own tokenizer must map tokens to the same ids
as the run's tokenizer. Width, depth, heads, experts and rope settings may differ (an 8B teacher, a 2B student).
"""

from __future__ import annotations

import os

from vaopd_jax.models.qwen3_vl import Qwen3VLConfig


class ModelMismatchError(ValueError):
    """The teacher and the student do not share what distillation needs (their differences listed)."""


# (config field, why it must agree): attribute paths of Qwen3VLConfig.
SHARED_FIELDS = (
    ("text.vocab_size", "the token KL (Eq. 1) compares distributions over one vocabulary"),
    ("image_token_id", "the prompts' <|image_pad|> tokens, where both models insert image features"),
    ("video_token_id", "the video placeholder id both models' position ids look for"),
    ("vision_start_token_id", "the token opening each image in the shared prompts"),
    ("vision_end_token_id", "the token closing each image in the shared prompts"),
    ("vision.patch_size", "the pixel rows of both views come from one processor (patch_dim)"),
    ("vision.temporal_patch_size", "the pixel rows of both views come from one processor (patch_dim)"),
    ("vision.in_channels", "the pixel rows of both views come from one processor (patch_dim)"),
    ("vision.spatial_merge_size", "the image-token count and the MRoPE position ids are computed once for both"),
    ("vision.num_position_embeddings", "the vision position-embedding interpolation is computed once, on the "
                                       "student's grid"),
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _get(config: Qwen3VLConfig, path: str):
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def config_differences(student: Qwen3VLConfig, teacher: Qwen3VLConfig) -> list[str]:
    """One line per SHARED_FIELDS entry on which the two configs differ (empty when they can be paired)."""
    return [f"{field}: student {_get(student, field)!r}, teacher {_get(teacher, field)!r} ({why})"
            for field, why in SHARED_FIELDS if _get(student, field) != _get(teacher, field)]


def tokenizer_differences(tokenizer, teacher_path: str) -> list[str]:
    """How the tokenizer shipped in ``teacher_path`` differs from the run's ``tokenizer`` (size, and tokens
    whose ids differ, first few named); empty when the directory has no tokenizer files or they agree."""
    if tokenizer is None or not any(os.path.isfile(os.path.join(teacher_path, f)) for f in _TOKENIZER_FILES):
        return []
    if hasattr(tokenizer, "base_ids"):  # a demo task vocabulary: its ids are not the checkpoint's
        return []
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True)
    ours_vocab, their_vocab = tokenizer.get_vocab(), theirs.get_vocab()
    problems = []
    if len(ours_vocab) != len(their_vocab):
        problems.append(f"tokenizer: the run's has {len(ours_vocab):,} tokens, the teacher's ({teacher_path}) "
                        f"{len(their_vocab):,}")
    moved = sorted(t for t, i in ours_vocab.items() if their_vocab.get(t, -1) != i)
    if moved:
        shown = ", ".join(f"{t!r}: {ours_vocab[t]} vs {their_vocab.get(t, 'absent')}" for t in moved[:3])
        problems.append(f"tokenizer: {len(moved):,} tokens have other ids in the teacher's ({teacher_path}), e.g. "
                        f"{shown}: the teacher would score other tokens than the student sampled")
    return problems


def check_pair(student: Qwen3VLConfig, teacher: Qwen3VLConfig, *, tokenizer=None,
               teacher_path: str | None = None) -> None:
    """Raises ModelMismatchError listing every difference that makes distillation between them meaningless.

    Args:
      student, teacher: the two loaded models' configs.
      tokenizer: the run's tokenizer (checked against ``teacher_path``'s own tokenizer files, if any).
      teacher_path: the teacher's Hugging Face directory (None: a teacher built in the run, nothing to compare).
    """
    problems = config_differences(student, teacher)
    if teacher_path:
        problems += tokenizer_differences(tokenizer, str(teacher_path))
    if problems:
        raise ModelMismatchError(
            "the teacher and the student cannot be distilled into each other:\n  " + "\n  ".join(problems)
            + "\nPick a teacher and a student of one family (the same tokenizer, image-token ids and vision "
            "patching), e.g. Qwen3-VL-8B-Instruct -> Qwen3-VL-2B-Instruct.")
