"""Scoring hooks for the flexo_* lm-eval tasks (referenced from the YAMLs as ``!function``).

The YAMLs name these as ``flexo.lm_tasks.utils.<fn>``: lm-eval imports the installed module (there is
no ``utils.py`` beside the rendered YAMLs), so a judge installed with
:func:`flexo.lm_tasks.judge.set_judge` is the one the NewsG/PoemG hooks see.

Every function here is our own implementation of the published scoring rule it names.
"""

from __future__ import annotations

import os
import re
import string
import subprocess
import sys
import tempfile
from collections import Counter

from flexo.lm_tasks import judge as _judge

# ----------------------------------------------------------------------------------- QA (Gen5, SciRIFF)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    """Best exact match and best token F1 of one answer against all gold answers."""
    golds = [g for g in golds if isinstance(g, str)] or [""]
    return {
        "exact_match": max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds),
        "f1": max(token_f1(prediction, g) for g in golds),
    }


def process_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """Gen5 / SciRIFF QA: ``doc['answers']`` holds every acceptable answer."""
    return qa_scores(results[0].strip(), list(doc["answers"]))


# ---------------------------------------------------------------------------------------------- GSM8K
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_THE_ANSWER = re.compile(r"answer is\s*\$?\s*(-?\s?[\d,]*\.?\d+)", re.IGNORECASE)


def _clean_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def gsm8k_extract(generation: str) -> str | None:
    """The model's final number: after 'the answer is' (the few-shot format), else the last number."""
    m = _THE_ANSWER.search(generation)
    if m:
        return _clean_number(m.group(1))
    numbers = _NUMBER.findall(generation)
    return _clean_number(numbers[-1]) if numbers else None


def process_gsm8k(doc: dict, results: list[str]) -> dict[str, float]:
    pred = gsm8k_extract(results[0])
    return {"exact_match": float(pred is not None and pred == _clean_number(doc["short_answer"]))}


# ------------------------------------------------------------------------------------------ MATH (Minerva)
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5" form
        rest = text[start:].split(None, 1)
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_FINAL = re.compile(r"final answer is\s*\$(.+?)\$\s*\.?\s*I hope", re.IGNORECASE | re.DOTALL)
# Unit and filler words dropped before comparison (the Minerva paper's normalisation, re-implemented).
_UNIT_WORDS = (
    "square units|square feet|square inches|square meters|square centimeters|sq units|units|unit|"
    "degrees|degree|cents|cent|dollars|dollar|inches|inch|feet|foot|meters|meter|centimeters|cm|mph|"
    "hours|hour|minutes|minute|seconds|second|days|day|weeks|week|years|year|people|points|ways|"
    "students|marbles|cups|pounds|miles|mile"
)
_UNITS = re.compile(rf"(\\text\{{\s*)?\b({_UNIT_WORDS})\b(\s*\}})?")


def normalize_math_answer(answer: str) -> str:
    """Canonical string form of a final answer (Minerva-style normalisation; our implementation)."""
    s = answer.strip()
    s = s.split("=")[-1].strip() if s.count("=") == 1 and len(s.split("=")[0]) <= 2 else s
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(mbox|mathrm|textbf|mathbf)\{\s*([^{}]*)\}", r"\2", s)
    s = _UNITS.sub("", s)
    for old, new in (
        ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\left", ""), ("\\right", ""),
        ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""),
        ("dfrac", "frac"), ("tfrac", "frac"), ("\\displaystyle", ""),
    ):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    # \frac12 -> \frac{1}{2}; \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    # 1,000 -> 1000 (only for plain numbers); 5.0 -> 5; 0.5 stays
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def minerva_extract(generation: str) -> str | None:
    """The answer the few-shot format asks for ('Final Answer: The final answer is $X$. I hope...')."""
    m = _FINAL.search(generation)
    if m:
        return m.group(1)
    return last_boxed(generation)


def process_minerva(doc: dict, results: list[str]) -> dict[str, float]:
    pred = minerva_extract(results[0])
    if pred is None:
        return {"exact_match": 0.0}
    return {"exact_match": float(normalize_math_answer(pred) == normalize_math_answer(doc["answer"]))}


# ---------------------------------------------------------------------------------------------- code
CODE_TIMEOUT_S = float(os.environ.get("FLEXO_CODE_TIMEOUT_S", "10"))


def _limit_child() -> None:  # pragma: no cover - runs in the child process
    import resource

    gib = 1 << 30
    resource.setrlimit(resource.RLIMIT_AS, (4 * gib, 4 * gib))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    os.setsid()


def run_python(program: str, timeout_s: float = CODE_TIMEOUT_S) -> bool:
    """Run untrusted model code in a fresh, isolated interpreter in a scratch folder; True iff exit 0.

    A separate process with a time limit, an address-space cap and no stdin. This is the usual
    protection of code benchmarks (a crash or a hang cannot take the evaluation down), not a sandbox:
    run it only where executing model-written code is acceptable (lm-eval asks for
    ``confirm_run_unsafe_code``).
    """
    with tempfile.TemporaryDirectory(prefix="flexo-code-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "HOME": tmp}
        try:
            proc = subprocess.run(
                [sys.executable, "-I", path],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout_s,
                preexec_fn=_limit_child if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def strip_code_fence(completion: str) -> str:
    """Cut a completion at the closing fence (the stop sequence may be missing at max length)."""
    return completion.split("```", 1)[0]


def process_mbpp(doc: dict, results: list[str]) -> dict[str, float]:
    """MBPP pass@1 (greedy): the completion plus the problem's setup code and its three asserts."""
    code = strip_code_fence(results[0])
    program = "\n".join([code, doc.get("test_setup_code") or "", *doc["test_list"], ""])
    return {"pass_at_1": float(run_python(program))}


def process_humaneval(doc: dict, results: list[str]) -> dict[str, float]:
    """HumanEval pass@1 (greedy): prompt + completion, then the problem's ``check`` on its entry point."""
    completion = strip_code_fence(results[0])
    program = doc["prompt"] + completion + "\n\n" + doc["test"] + f"\n\ncheck({doc['entry_point']})\n"
    return {"pass_at_1": float(run_python(program))}


# ------------------------------------------------------------------------------- NewsG / PoemG (judge)
def process_newsg(doc: dict, results: list[str]) -> dict[str, float]:
    return {"judge_score": _judge.judge_score("news", doc["request"], results[0])}


def process_poemg(doc: dict, results: list[str]) -> dict[str, float]:
    return {"judge_score": _judge.judge_score("poem", doc["request"], results[0])}



# ------------------------------------------------------------------------------ SciRIFF (hub-only tasks)
def _sciriff_answers(output: str) -> list[str]:
    """Reference answers of a SciRIFF row: a JSON list of strings when the output is one, else the text."""
    import json

    try:
        value = json.loads(output)
    except (TypeError, ValueError):
        return [output]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return [output]


def _sciriff_filter(task_name: str):
    def process_docs(dataset):
        prefix = task_name + ":"
        return dataset.filter(lambda row: str(row["_instance_id"]).startswith(prefix))

    process_docs.__name__ = f"sciriff_docs_{task_name}"
    return process_docs


sciriff_docs_bioasq_factoid = _sciriff_filter("bioasq_factoid_qa")
sciriff_docs_bioasq_general = _sciriff_filter("bioasq_general_qa")
sciriff_docs_covid_deepset_qa = _sciriff_filter("covid_deepset_qa")


def process_sciriff(doc: dict, results: list[str]) -> dict[str, float]:
    return qa_scores(results[0].strip(), _sciriff_answers(doc["output"]))
