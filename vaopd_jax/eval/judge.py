"""A pluggable LLM judge for answer extraction (any OpenAI-compatible endpoint).

Where an official protocol extracts answers with an LLM (MathVista, MathVerse in
VLMEvalKit, MMMU / MMStar fallbacks), the evaluator can call a judge given by URL and
model name, e.g. a local vLLM server: ``--config.judge.url=http://localhost:8000/v1
--config.judge.model=Qwen/Qwen2.5-72B-Instruct``. Only the standard library is used
(urllib). Without a judge, rule-based extraction is used and the summary says so.
The judge is asked only where the rules found no answer; its failures (network,
malformed reply) are counted and fall back to "no answer".
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

from vaopd_jax.eval.benchmarks.common import LETTERS

logger = logging.getLogger(__name__)

CHOICE_PROMPT = (
    "You are grading a model's reply to a multiple-choice question. Reply with the single "
    "option letter the model chose, or NONE if it did not commit to one. Reply with nothing else.\n\n"
    "Question:\n{question}\n\nOptions:\n{options}\n\nModel reply:\n{response}\n\nLetter:"
)
ANSWER_PROMPT = (
    "Extract the final answer from a model's reply to a math question. Reply with the answer "
    "only (a number, expression or short text), or NONE if the reply gives no final answer.\n\n"
    "Question:\n{question}\n\nModel reply:\n{response}\n\nFinal answer:"
)


class OpenAICompatibleJudge:
    """Answer extraction by a chat-completions endpoint.

    Args:
      url: base URL (``http://host:port/v1``) or the full ``.../chat/completions`` URL.
      model: model name sent in the request.
      api_key_env: environment variable holding a bearer token (optional).
      timeout_s: per-request timeout.
      max_response_chars: the model reply is cut to this many characters (the end kept).
      opener: callable(request, timeout) -> response (tests inject a fake; default urlopen).
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_response_chars: int = 6000, opener: Optional[Callable] = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge.url must start with http:// or https://, got {url!r}")
        if not model:
            raise ValueError("judge.model must name the judge model when judge.url is set")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout_s = timeout_s
        self.max_response_chars = max_response_chars
        self._open = opener or urllib.request.urlopen
        self.calls = 0
        self.failures = 0

    def describe(self) -> str:
        return f"LLM judge {self.model} at {self.url}"

    def _complete(self, prompt: str) -> Optional[str]:
        body = json.dumps({
            "model": self.model, "temperature": 0.0, "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}],
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.calls += 1
        try:
            with self._open(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
            self.failures += 1
            logger.warning("judge request to %s failed (%s: %s); the sample counts as unanswered",
                           self.url, type(err).__name__, err)
            return None

    def _cut(self, response: str) -> str:
        return (response or "")[-self.max_response_chars :]

    def extract_choice(self, question: str, response: str, options: Optional[Sequence[str]]) -> Optional[str]:
        """Option letter chosen in ``response`` according to the judge, or None."""
        option_text = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options or [])) or "(in the question)"
        reply = self._complete(CHOICE_PROMPT.format(question=question, options=option_text,
                                                    response=self._cut(response)))
        if reply is None:
            return None
        match = re.match(r"^\W*([A-Z])\b", reply.strip())
        valid = LETTERS[: len(options)] if options else LETTERS
        if match is None or reply.strip().upper().startswith("NONE") or match.group(1) not in valid:
            return None
        return match.group(1)

    def extract_answer(self, question: str, response: str) -> Optional[str]:
        """Final answer text of ``response`` according to the judge, or None."""
        reply = self._complete(ANSWER_PROMPT.format(question=question, response=self._cut(response)))
        if reply is None or not reply.strip() or reply.strip().upper().startswith("NONE"):
            return None
        return reply.strip()


def make_judge(url: str, model: str, **kwargs) -> Optional[OpenAICompatibleJudge]:
    """A judge when ``url`` is set, else None (rule-based extraction)."""
    if not url:
        return None
    return OpenAICompatibleJudge(url, model, **kwargs)
