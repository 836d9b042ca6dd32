"""models/compat.py: a teacher and a student that cannot be distilled together are refused, every difference
named (the trainer calls it right after loading both; tests/test_train_faults.py runs that end to end)."""

import dataclasses

import pytest

from vaopd_jax.models import compat
from vaopd_jax.models.qwen3_vl import testing


def test_every_shared_field_that_differs_is_named():
    student = testing.tiny_config()
    teacher = student.replace(image_token_id=student.image_token_id - 1,
                              vision=dataclasses.replace(student.vision, spatial_merge_size=1, patch_size=8),
                              text=dataclasses.replace(student.text, vocab_size=student.text.vocab_size + 64,
                                                       hidden_size=student.text.hidden_size))
    with pytest.raises(compat.ModelMismatchError) as err:
        compat.check_pair(student, teacher)
    message = str(err.value)
    for field in ("text.vocab_size", "image_token_id", "vision.spatial_merge_size", "vision.patch_size"):
        assert f"{field}: student" in message, field
    assert message.count("\n  ") == 4
    # Width and depth may differ (a bigger teacher): no error.
    compat.check_pair(student, student.replace(text=dataclasses.replace(student.text, intermediate_size=256,
                                                                        num_attention_heads=8)))


def test_a_teacher_tokenizer_with_other_ids_is_named(tmp_path):
    from vaopd_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    tokenizer.save_pretrained(tmp_path / "same")
    assert compat.tokenizer_differences(tokenizer, str(tmp_path / "same")) == []
    other = load_tokenizer(None)
    other.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    other.save_pretrained(tmp_path / "other")
    problems = compat.tokenizer_differences(tokenizer, str(tmp_path / "other"))
    assert len(problems) == 1 and f"the run's has {len(tokenizer):,} tokens" in problems[0]
    assert f"the teacher's ({tmp_path / 'other'}) {len(tokenizer) + 2:,}" in problems[0]
    assert compat.tokenizer_differences(tokenizer, str(tmp_path / "no_tokenizer_here")) == []
