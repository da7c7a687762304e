"""The LLM judge behind NewsG and PoemG: a 0–5 rubric score, reported on a 0–100 scale.

The paper scores open-ended news articles and poems with an LLM judge on a 0–5 rubric. Here the judge
is whatever the user configures, in this order:

1. a Python callable installed with :func:`set_judge` (``judge(prompt) -> reply text``; tests use it);
2. ``FLEXO_JUDGE_URL`` + ``FLEXO_JUDGE_MODEL``: an OpenAI-compatible chat endpoint (vLLM, llama.cpp
   server, a hosted API; ``FLEXO_JUDGE_API_KEY`` is sent as a bearer token when set);
3. ``FLEXO_JUDGE_MODEL`` alone, naming a local transformers causal-LM folder.

With none of these the score is NaN and a warning is logged: an unavailable metric is never replaced
by a made-up number. A reply that carries no readable 0–5 score is NaN too (and logged).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import urllib.request
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

Judge = Callable[[str], str]

# The rubrics were written for this project. Each level says what a reader would see, so that a judge
# model (or a person) can apply them without examples.
RUBRICS: dict[str, str] = {
    "news": (
        "0 - No article: empty, unreadable, or unrelated to the headline.\n"
        "1 - Barely an article: fragments or heavy repetition; only loosely tied to the headline.\n"
        "2 - On topic but weak: disorganised, vague or self-contradictory; reads little like news.\n"
        "3 - A recognisable news article: an opening that states the news, mostly coherent, some "
        "repetition, gaps or implausible details.\n"
        "4 - A good news article: clear lede, concrete who/what/when/where, logical order, neutral "
        "tone; only minor flaws.\n"
        "5 - Publication quality: fluent, well organised, specific and internally consistent, fully "
        "answers the headline."
    ),
    "poem": (
        "0 - No poem: empty, unreadable, or unrelated to the request.\n"
        "1 - Barely a poem: fragments or heavy repetition; only loosely tied to the request.\n"
        "2 - Weak: on topic but flat or incoherent; little sense of line, sound or image.\n"
        "3 - A recognisable poem: follows the request, has line structure and some imagery, but "
        "uneven or clichéd.\n"
        "4 - A good poem: coherent, vivid imagery, deliberate form and sound, follows every part of "
        "the request; minor flaws.\n"
        "5 - Excellent: striking, original and controlled; form, sound and meaning work together."
    ),
}

_KIND_WORDS = {"news": "news article", "poem": "poem"}

JUDGE_TEMPLATE = (
    "You are grading a {what} written by a language model.\n\n"
    "Request given to the model:\n{request}\n\n"
    "The model's {what}:\n<<<\n{response}\n>>>\n\n"
    "Rubric (0 to 5):\n{rubric}\n\n"
    "Judge only the text between <<< and >>>. Answer with one line of the form 'Score: N', "
    "where N is an integer from 0 to 5."
)

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([0-5](?:\.\d+)?)\b", re.IGNORECASE)
_LONE = re.compile(r"^\s*\**\s*([0-5](?:\.\d+)?)\s*\**\s*(?:/\s*5)?\s*$", re.MULTILINE)

_lock = threading.Lock()
_injected: Judge | None = None
_from_env: tuple[tuple[str | None, str | None], Judge | None] | None = None
_warned: set[str] = set()


def judge_prompt(kind: str, request: str, response: str) -> str:
    """The text sent to the judge for one generation (``kind`` is ``news`` or ``poem``)."""
    return JUDGE_TEMPLATE.format(
        what=_KIND_WORDS[kind], request=request.strip(), response=response.strip(), rubric=RUBRICS[kind]
    )


def parse_score(reply: str) -> float:
    """The 0–5 score in a judge's reply, or NaN when there is none (no guessing)."""
    m = _SCORE.search(reply) or _LONE.search(reply)
    if not m:
        return math.nan
    value = float(m.group(1))
    return value if 0.0 <= value <= 5.0 else math.nan


def to_percent(score_0_5: float) -> float:
    """The paper's mapping of the 0–5 rubric onto 0–100."""
    return score_0_5 * 20.0


def set_judge(judge: Judge | None) -> None:
    """Install a judge callable for this process (``None`` removes it; the env config applies again)."""
    global _injected
    with _lock:
        _injected = judge


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


class OpenAICompatibleJudge:
    """Chat-completions client for any OpenAI-compatible server (greedy, short reply)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0):
        url = url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url = url + "/chat/completions"
        self.url, self.model, self.api_key, self.timeout_s = url, model, api_key, timeout_s

    def __call__(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0,
                "max_tokens": 16,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"] or ""


class TransformersJudge:
    """A local causal LM folder as the judge (greedy decoding; chat template when the tokenizer has one)."""

    def __init__(self, model_dir: str | Path, *, device: str | None = None, max_new_tokens: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompt: str) -> str:
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt + "\n"
        enc = tok(text, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def judge_from_env() -> Judge | None:
    """Build the judge that ``FLEXO_JUDGE_URL`` / ``FLEXO_JUDGE_MODEL`` describe (cached), or None."""
    global _from_env
    url = os.environ.get("FLEXO_JUDGE_URL") or None
    model = os.environ.get("FLEXO_JUDGE_MODEL") or None
    key = (url, model)
    with _lock:
        if _from_env is not None and _from_env[0] == key:
            return _from_env[1]
        judge: Judge | None = None
        if url and model:
            judge = OpenAICompatibleJudge(url, model, api_key=os.environ.get("FLEXO_JUDGE_API_KEY") or None)
        elif url:
            _warn_once("url-no-model", "FLEXO_JUDGE_URL is set but FLEXO_JUDGE_MODEL is not: no judge")
        elif model:
            if Path(model).is_dir():
                judge = TransformersJudge(model)
            else:
                _warn_once(
                    "model-not-dir",
                    f"FLEXO_JUDGE_MODEL={model!r} is not a local model folder and FLEXO_JUDGE_URL is unset: "
                    "no judge (set FLEXO_JUDGE_URL to use it through an OpenAI-compatible server)",
                )
        _from_env = (key, judge)
        return judge


def current_judge() -> Judge | None:
    """The injected judge if any, else the one configured by environment variables, else None."""
    with _lock:
        injected = _injected
    return injected if injected is not None else judge_from_env()


def judge_score(kind: str, request: str, response: str) -> float:
    """Score one generation on 0–100, or NaN when no judge is configured or its reply has no score."""
    judge = current_judge()
    if judge is None:
        _warn_once(
            "no-judge",
            "NewsG/PoemG: no judge configured (set FLEXO_JUDGE_MODEL, and FLEXO_JUDGE_URL for a server, "
            "or call flexo.lm_tasks.judge.set_judge): their scores are reported as NaN",
        )
        return math.nan
    reply = judge(judge_prompt(kind, request, response))
    score = parse_score(reply)
    if math.isnan(score):
        log.warning("judge reply carries no 0-5 score, item scored NaN: %r", reply[:200])
        return math.nan
    return to_percent(score)
