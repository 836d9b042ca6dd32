"""Offline Qwen3-VL tokenizer: real special ids, BPE equal to the tiktoken ranks, round trips, cache."""

import pytest

from vaopd_jax.data import tokenizer as T

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TEXTS = [
    "Find x. Round to the nearest tenth if necessary.",
    "If \\triangle ABC \\sim \\triangle DEF, find \\frac { 3 } { 2 } + 2 \\sqrt { 221 } = ?  $x^{2}+y_{1}$",
    "如图，在三角形ABC中，∠C=90°，求边长。答案是：\\boxed{12}",
    "  leading spaces\n\n\ttabs, newlines\r\n and numbers 1234567 3.14159 -2e10",
    "emoji 🙂 and accents café naïve Ωμέγα",
]


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


def test_special_token_ids_are_the_real_ones(tok):
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
        "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655,
        "<|video_pad|>": 151656, "<tool_call>": 151657, "<|fim_prefix|>": 151659, "<think>": 151667,
        "</think>": 151668,
    }
    for content, idx in expected.items():
        assert tok.convert_tokens_to_ids(content) == idx
        assert tok.encode(content, add_special_tokens=False) == [idx]
    assert len(tok) == 151669
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    # <think> is an added but non-special token in the real tokenizer: it survives skip_special_tokens.
    assert tok.decode([151667, 9707, 151645], skip_special_tokens=True) == "<think>Hello"


def test_encoding_equals_tiktoken_and_round_trips(tok):
    import tiktoken

    ranks = T.read_tiktoken_ranks(T.tiktoken_vocab_path())
    reference = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("Hello world!", add_special_tokens=False) == [9707, 1879, 0]


def test_chat_template_renders_qwen3_vl_form(tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x.<|im_end|>\n<|im_start|>assistant\n"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(system, tokenize=False) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_cache_is_reused_and_checkpoint_dirs_load(tok, tmp_path):
    cache = T.default_cache_dir()
    assert (cache / "tokenizer.json").is_file()
    # A checkpoint directory (what save_pretrained writes) loads through AutoTokenizer, same ids.
    tok.save_pretrained(str(tmp_path / "ckpt"))
    loaded = T.load_tokenizer(str(tmp_path / "ckpt"))
    assert loaded.encode(TEXTS[2], add_special_tokens=False) == tok.encode(TEXTS[2], add_special_tokens=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        T.load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load_tokenizer(str(tmp_path / "empty"))


def test_vocab_and_merges_reproduce_rank_order():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    vocab, merges = T.vocab_and_merges(ranks)
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    # ordered by merged rank, then by the parts' ranks: abc = ab+c (3,2) before a+bc (0,4)? no: (0,4) < (3,2)
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]
