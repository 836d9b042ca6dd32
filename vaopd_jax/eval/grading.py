"""Answer extraction and grading, shared by training-time validation and evaluation.

Extraction follows docs/data.md: the *first committed answer* of a response is the
content of its first balanced ``\\boxed{...}``; if there is none, the text of the first
explicit ``Answer:`` line. Free-form math is graded with math-verify (``parse`` +
``verify``). math-verify guards itself with ``signal.alarm``, which only works on the
main thread of a process, so we call it with its own timeouts disabled inside a small
pool of worker processes and enforce our own wall-clock limit per item: a worker that
overruns is killed and replaced, the item counts as wrong and is logged.

Public API::

    extract_answer(text) -> str | None
    extract_boxed(text) -> str | None
    normalize_answer(text) -> str
    exact_match(pred, gold) -> bool
    normalized_match(pred, gold) -> bool
    extract_choice(pred, options=None) -> str | None      # 'A'..'Z'
    grade(pred, gold, *, timeout_s=5.0) -> bool
    grade_batch(preds, golds, *, timeout_s=5.0) -> list[bool]
    grade_batch_detailed(preds, golds, *, timeout_s=5.0) -> list[GradeResult]
    grade_responses(texts, golds) -> list[bool]              # extract, then grade
    grade_pairs(pairs, grader="math_verify"|"mathruler")     # the worker pool, cached, time-limited
    grading_counters() -> {"timeouts", "errors"}             # for logging
    shutdown()                                               # stop the worker pool

Workers are plain ``python -m vaopd_jax.eval.grading --worker`` subprocesses speaking JSON
lines (not multiprocessing), so grading works from any thread, notebook or unguarded
script. Throughput: ``python -m vaopd_jax.bench.grading``.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Optional, Sequence

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(
    r"(?im)^[ \t>*#_-]*(?:the\s+)?(?:final\s+)?answer[ \t]*(?:\*\*|__)?[ \t]*[:：][ \t]*(?:\*\*|__)?(.*)$"
)


def _balanced_group(text: str, open_index: int) -> Optional[str]:
    """Content of the brace group opening at text[open_index] == '{', or None if unbalanced.

    Escaped braces (``\\{``, ``\\}``) do not count, as in LaTeX.
    """
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> Optional[str]:
    """Content of the FIRST balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    An unbalanced box (a response truncated inside it) is skipped and the search goes on.
    ``\\boxed 5`` (no braces) yields the following token. Returns None if there is none.
    Note: mathruler's ``extract_boxed_content`` takes the LAST box; the spec asks for the
    first committed answer, so later (e.g. revised) boxes are ignored on purpose.
    """
    pattern = re.compile("|".join(re.escape(c) for c in _BOX_COMMANDS))
    for match in pattern.finditer(text):
        j = match.end()
        if j < len(text) and text[j].isalpha():
            continue  # e.g. \boxedsymbol: a different command
        while j < len(text) and text[j] in " \t":
            j += 1
        if j >= len(text):
            continue
        if text[j] == "{":
            content = _balanced_group(text, j)
            if content is not None:
                return content.strip()
            continue
        if j > match.end():  # "\boxed 5": a single space-delimited token
            token = re.match(r"[^\s$]+", text[j:])
            if token:
                return token.group(0).strip()
    return None


def _strip_think(text: str) -> Optional[str]:
    """Drop a reasoning block: answers inside ``<think>…</think>`` are not committed.

    An unclosed ``<think>`` (generation cut inside the reasoning) commits nothing.
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if text.lstrip().startswith("<think>"):
        return None
    return text


def _clean_answer_text(answer: str) -> str:
    answer = answer.strip()
    answer = re.sub(r"^(?:\*\*|__)|(?:\*\*|__)$", "", answer).strip()
    answer = answer.rstrip(".").strip()
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)].strip()
    return answer.rstrip(".").strip()


def extract_answer(text: Optional[str]) -> Optional[str]:
    """The first committed answer of a model response, or None.

    Order (docs/data.md): the first balanced ``\\boxed{}``; else the first explicit
    ``Answer:`` line (also ``Final Answer:``, ``**Answer:**``), taking the rest of that
    line, or the next non-empty line when the rest is empty. Text inside a closed
    ``<think>`` block is ignored.
    """
    if not text:
        return None
    text = _strip_think(text)
    if text is None:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    match = _ANSWER_LINE.search(text)
    if match is None:
        return None
    answer = _clean_answer_text(match.group(1))
    if not answer:
        rest = text[match.end() :].lstrip("\n")
        for line in rest.splitlines():
            if line.strip():
                answer = _clean_answer_text(line)
                break
    return answer or None


# --------------------------------------------------------------------------------------
# Normalization and cheap matches
# --------------------------------------------------------------------------------------

_LATEX_SPACES = re.compile(r"\\[,;:!> ]|\\quad|\\qquad|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGNMENT = re.compile(r"^[a-z](?:_\{?\w+\}?)?=(.+)$")


def normalize_answer(text: Optional[str]) -> str:
    """Canonical string form for cheap comparison (not a full math equivalence).

    Removes math delimiters, LaTeX spacing (``2 \\sqrt { 221 }`` -> ``2\\sqrt{221}``),
    ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, degree marks
    (``17^\\circ`` -> ``17``), percent signs, ``\\text{}`` wrappers, thousands separators
    and a trailing period; lower-cases the result.
    """
    if text is None:
        return ""
    s = _clean_answer_text(str(text))
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LATEX_SPACES.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    for _ in range(3):  # nested wrappers such as \text{\textbf{x}}
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s.lower()


def _as_float(s: str) -> Optional[float]:
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def exact_match(pred: Optional[str], gold: Optional[str]) -> bool:
    """Equality after stripping surrounding whitespace (None never matches)."""
    if pred is None or gold is None:
        return False
    return str(pred).strip() == str(gold).strip()


def normalized_match(pred: Optional[str], gold: Optional[str]) -> bool:
    """Equality of :func:`normalize_answer` forms, or of their numeric values.

    Numbers compare with a relative tolerance of 1e-6 (``0.50`` == ``.5``); a single
    variable assignment on one side only is reduced to its right-hand side
    (``x=5`` == ``5``).
    """
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    p_assign, g_assign = _ASSIGNMENT.match(p), _ASSIGNMENT.match(g)
    if p_assign and not g_assign:
        p = p_assign.group(1)
    elif g_assign and not p_assign:
        g = g_assign.group(1)
    if p == g:
        return True
    pf, gf = _as_float(p), _as_float(g)
    if pf is not None and gf is not None:
        return math.isclose(pf, gf, rel_tol=1e-6, abs_tol=1e-9)
    return False


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER_ONLY = re.compile(r"^[(\[]?([A-Za-z])[)\].:]?$")
_LETTER_PREFIX = re.compile(r"^[(\[]?([A-Z])(?:[)\].:]|\s*[-–:])\s*\S")
_LETTER_PHRASE = re.compile(
    r"(?i)\b(?:option|choice|answer(?:\s+is)?|correct\s+(?:option|choice|answer)\s+is)\s*[:：]?\s*[(\[]?([A-Z])\b[)\]]?"
)


def extract_choice(pred: Optional[str], options: Optional[Sequence[str]] = None) -> Optional[str]:
    """The option letter a prediction commits to ('A'..'Z'), or None.

    Accepts a bare letter (``B``, ``(B)``, ``B.``), a letter followed by the option text
    (``B. 45°``), a phrase (``Option B``, ``the answer is (B)``), or — when ``options``
    (the option texts, in letter order) are given — the text of exactly one option
    (after :func:`normalize_answer`, e.g. ``45^\\circ`` matches option ``45°``). With
    ``options``, letters outside ``A..`` the option count are rejected.
    """
    if pred is None:
        return None
    text = _clean_answer_text(str(pred))
    for _ in range(2):
        text = _TEXT_WRAPPERS.sub(r"\1", text)
    text = text.strip()
    if not text:
        return None
    valid = _LETTERS[: len(options)] if options else _LETTERS
    letter = None
    only = _LETTER_ONLY.match(text)
    if only and (only.group(1).isupper() or options):
        letter = only.group(1).upper()
    if letter is None:
        prefix = _LETTER_PREFIX.match(text)
        if prefix:
            letter = prefix.group(1)
    if letter is None and options:
        wanted = normalize_answer(text)
        hits = [i for i, opt in enumerate(options) if normalize_answer(opt) == wanted]
        if not hits:
            hits = [i for i, opt in enumerate(options) if normalized_match(text, opt)]
        if len(hits) == 1:
            letter = _LETTERS[hits[0]]
    if letter is None:
        phrase = _LETTER_PHRASE.search(text)
        if phrase:
            letter = phrase.group(1).upper()
    if letter is not None and letter in valid:
        return letter
    return None


# --------------------------------------------------------------------------------------
# math-verify in worker processes with our own time limit
# --------------------------------------------------------------------------------------


class GradeResult(NamedTuple):
    """Outcome of grading one prediction.

    status: 'empty' (no prediction), 'normalized' (cheap match), 'verified' / 'rejected'
    (math-verify's decision), 'timeout' (over the time limit: counted wrong),
    'error' (math-verify raised or the worker died: counted wrong).
    """

    correct: bool
    status: str


def _verify_in_worker(pred: str, gold: str) -> bool:
    import math_verify

    def wrap(s: str) -> str:
        # Extracted answers carry no $..$ delimiters: a box makes math-verify's LaTeX
        # extractor take the whole string.
        return s if "\\boxed" in s else "\\boxed{" + s + "}"

    gold_parsed = math_verify.parse(wrap(gold), parsing_timeout=None)
    pred_parsed = math_verify.parse(wrap(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _mathruler_in_worker(pred: str, gold: str) -> bool:
    from mathruler.grader import grade_answer

    return bool(grade_answer(pred, gold))


GRADERS = {"math_verify": _verify_in_worker, "mathruler": _mathruler_in_worker}


def _worker_main() -> None:
    """Worker loop (``python -m vaopd_jax.eval.grading --worker``): JSON lines in and out.

    Reads ``[pred, gold, grader]`` per line on stdin (grader: a GRADERS key), answers
    ``["ok", bool]`` or ``["error", message]``; the first line written is ``["ready", null]``.
    """
    import math_verify.grader
    import math_verify.parser

    # We enforce time limits from the parent; silence math-verify's one-time warning.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _verify_in_worker("1", "1")  # warm sympy's lazy imports before the parent starts the clock
    try:
        _mathruler_in_worker("1", "1")
    except ImportError:  # only validation grading needs mathruler; its caller checks the import
        pass
    out = sys.stdout
    out.write(json.dumps(["ready", None]) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            pred, gold, grader = json.loads(line)
            reply = ["ok", GRADERS[grader](pred, gold)]
        except Exception as exc:  # noqa: BLE001 - any parser failure is a wrong answer
            reply = ["error", f"{type(exc).__name__}: {exc}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    """One grading subprocess. A plain ``python -m`` child, not multiprocessing: it never
    re-imports the caller's ``__main__`` and is safe to start from any thread or notebook."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vaopd_jax.eval.grading", "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"},
        )
        self.item: Optional[int] = None
        self.deadline = 0.0
        self.ready = False

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, pred: str, gold: str, grader: str = "math_verify") -> None:
        self.process.stdin.write((json.dumps([pred, gold, grader]) + "\n").encode("utf-8"))
        self.process.stdin.flush()

    def recv(self) -> list:
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("math-verify worker exited")
        return json.loads(line)

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the worker has imported math-verify (start-up is not graded time)."""
        if not self.ready:
            readable, _, _ = select.select([self], [], [], timeout_s)
            try:
                self.ready = bool(readable) and self.recv()[0] == "ready"
            except (EOFError, ValueError, OSError):
                self.ready = False
        return self.ready

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class VerifyPool:
    """A few math-verify worker processes with a per-item wall-clock limit.

    A worker that exceeds its time limit is killed and replaced; its item is reported
    as 'timeout'. Worker start-up (importing sympy, ~1-2 s) happens before the clock
    of any item starts.
    """

    def __init__(self, num_workers: Optional[int] = None, startup_timeout_s: float = 120.0):
        if num_workers is None:
            num_workers = max(1, min(4, os.cpu_count() or 1))
        if num_workers < 1:
            raise ValueError(f"VerifyPool num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.num_timeouts = 0
        self.num_errors = 0

    def _start(self, count: int) -> list[_Worker]:
        fresh = [_Worker() for _ in range(count)]  # started together, awaited together
        for worker in fresh:
            if not worker.wait_ready(self.startup_timeout_s):
                for w in fresh:
                    w.kill()
                raise RuntimeError(
                    f"a math-verify worker process did not start within {self.startup_timeout_s:.0f}s "
                    f"(check `{sys.executable} -m vaopd_jax.eval.grading --worker`; is math-verify installed?)")
        return fresh

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self._workers.remove(worker)
        [replacement] = self._start(1)
        self._workers.append(replacement)
        return replacement

    def run(self, pairs: Sequence[tuple[str, ...]], timeout_s: float) -> list[GradeResult]:
        """Grade (pred, gold) or (pred, gold, grader) items (grader: a GRADERS key, default math_verify);
        results in input order."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        results: list[Optional[GradeResult]] = [None] * len(pairs)
        if not pairs:
            return []
        with self._lock:
            self._workers = [w for w in self._workers if w.alive()]
            wanted = min(self.num_workers, len(pairs))
            if len(self._workers) < wanted:
                self._workers += self._start(wanted - len(self._workers))
            pending = collections.deque(range(len(pairs)))
            idle = list(self._workers)
            busy: list[_Worker] = []
            while pending or busy:
                while pending and idle:
                    worker = idle.pop()
                    index = pending.popleft()
                    try:
                        worker.send(*pairs[index])
                    except OSError:  # the worker died while idle
                        idle.append(self._replace(worker))
                        pending.appendleft(index)
                        continue
                    worker.item = index
                    worker.deadline = time.monotonic() + timeout_s
                    busy.append(worker)
                wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                readable, _, _ = select.select(busy, [], [], wait_s)
                for worker in readable:
                    busy.remove(worker)
                    index = worker.item
                    try:
                        kind, value = worker.recv()
                    except (EOFError, ValueError, OSError):
                        kind, value = "error", "worker process died"
                    if kind == "ok":
                        results[index] = GradeResult(bool(value), "verified" if value else "rejected")
                        idle.append(worker)
                        continue
                    self.num_errors += 1
                    logger.warning("grading error on pred=%.200r gold=%.200r: %s", *pairs[index][:2], value)
                    results[index] = GradeResult(False, "error")
                    idle.append(worker if worker.alive() else self._replace(worker))
                now = time.monotonic()
                for worker in [w for w in busy if w.deadline <= now]:
                    busy.remove(worker)
                    index = worker.item
                    self.num_timeouts += 1
                    logger.warning("grading exceeded %.1fs on pred=%.200r gold=%.200r: counted as wrong",
                                   timeout_s, *pairs[index][:2])
                    results[index] = GradeResult(False, "timeout")
                    idle.append(self._replace(worker))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []


_POOL: Optional[VerifyPool] = None
_POOL_PID: Optional[int] = None
_CACHE: "collections.OrderedDict[tuple[str, str, str], GradeResult]" = collections.OrderedDict()
_CACHE_SIZE = 100_000


def _pool() -> VerifyPool:
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL = VerifyPool()
        _POOL_PID = os.getpid()
    return _POOL


def shutdown() -> None:
    """Stop the math-verify worker processes (restarted on the next grading call)."""
    global _POOL
    if _POOL is not None and _POOL_PID == os.getpid():
        _POOL.close()
    _POOL = None


atexit.register(shutdown)


def grading_counters() -> dict:
    """Counts of math-verify timeouts and errors in this process (for logging)."""
    if _POOL is None:
        return {"timeouts": 0, "errors": 0}
    return {"timeouts": _POOL.num_timeouts, "errors": _POOL.num_errors}


def grade_batch_detailed(
    preds: Sequence[Optional[str]],
    golds: Sequence[str],
    *,
    timeout_s: float = 5.0,
) -> list[GradeResult]:
    """Grade extracted answers against gold answers (free-form math).

    A None/empty prediction is wrong ('empty'); a :func:`normalized_match` is right
    without calling math-verify; the rest go to the worker pool, each with its own
    ``timeout_s`` wall-clock limit. Identical (pred, gold) pairs are graded once and
    results are cached across calls (avg@8 repeats answers often).
    """
    if len(preds) != len(golds):
        raise ValueError(f"grade_batch: {len(preds)} predictions but {len(golds)} gold answers")
    results: list[Optional[GradeResult]] = [None] * len(preds)
    todo: dict[tuple[str, str], list[int]] = {}
    for i, (pred, gold) in enumerate(zip(preds, golds)):
        if pred is None or not str(pred).strip():
            results[i] = GradeResult(False, "empty")
            continue
        gold = str(gold)
        if "\\boxed" in gold:  # ViRL39K stores gold answers inside \boxed{}
            gold = extract_boxed(gold) or gold
        key = (str(pred).strip(), gold.strip())
        if normalized_match(*key):
            results[i] = GradeResult(True, "normalized")
        else:
            todo.setdefault(key, []).append(i)
    if todo:
        keys = list(todo)
        for key, result in zip(keys, grade_pairs(keys, grader="math_verify", timeout_s=timeout_s)):
            for i in todo[key]:
                results[i] = result
    return results  # type: ignore[return-value]


def grade_pairs(pairs: Sequence[tuple[str, str]], *, grader: str = "math_verify",
                timeout_s: float = 5.0) -> list[GradeResult]:
    """``GRADERS[grader](pred, gold)`` of each pair in the worker pool, each with its own ``timeout_s``.

    No shortcut: every pair goes to the grader ('verified' / 'rejected', or 'timeout' / 'error',
    counted wrong). Identical pairs are graded once; decisions are cached across calls.

    Raises:
      ValueError: an unknown grader.
    """
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {sorted(GRADERS)}, got {grader!r}")
    results: list[Optional[GradeResult]] = [None] * len(pairs)
    todo: dict[tuple[str, str, str], list[int]] = {}
    for i, (pred, gold) in enumerate(pairs):
        key = (str(pred), str(gold), grader)
        cached = _CACHE.get(key)
        if cached is not None:
            results[i] = cached
        else:
            todo.setdefault(key, []).append(i)
    if todo:
        keys = list(todo)
        for key, result in zip(keys, _pool().run(keys, timeout_s)):
            if result.status in ("verified", "rejected"):
                _CACHE[key] = result
                if len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
            for i in todo[key]:
                results[i] = result
    return results  # type: ignore[return-value]


def grade_batch(
    preds: Sequence[Optional[str]], golds: Sequence[str], *, timeout_s: float = 5.0
) -> list[bool]:
    """Correctness of each extracted answer vs its gold answer; see grade_batch_detailed."""
    return [r.correct for r in grade_batch_detailed(preds, golds, timeout_s=timeout_s)]


def grade(pred: Optional[str], gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether one extracted answer equals the gold answer (free-form math)."""
    return grade_batch([pred], [gold], timeout_s=timeout_s)[0]


def grade_responses(
    texts: Sequence[str], golds: Sequence[str], *, timeout_s: float = 5.0
) -> list[bool]:
    """Extract the first committed answer of each response, then grade it."""
    return grade_batch([extract_answer(t) for t in texts], golds, timeout_s=timeout_s)


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        raise SystemExit("usage: python -m vaopd_jax.eval.grading --worker (a grading subprocess; see VerifyPool)")
    _worker_main()
