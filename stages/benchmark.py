"""Stage `benchmark`: the paper's 31-task evaluation (lm-eval group `flexolmo31`, FlexOlmo Table 2) on the
public model, both merged models, the model soup and BTM.

    flexo benchmark                            # the DVC stage: every model → results/flexolmo31/
    flexo benchmark --model DIR [--limit N]    # one FlexOlmo model folder → results/adhoc/
    (`flexo tasks --out DIR`, stages/tasks.py, renders the suite for plain lm-eval users)

The suite (flexo.lm_tasks.suite) has 31 members in the paper's 11 categories. Members whose data is
not on this machine (the hub-only tasks) or whose judge is not configured (NewsG and PoemG without
`FLEXO_JUDGE_MODEL`) are not run, and said so: the table shows how many of each category's tasks ran,
a category's score is the mean of the tasks that ran, and the average is the paper's (the mean of the
category scores) over the categories that ran, labelled with its counts. Nothing is ever NaN.

Every row reads public artifacts only (the public model, the merged models, the owners' published
packages for the soup and BTM): the stage runs on the central machine, with no owner's data.
`benchmark.limit` items per lm-eval task (per subject for MMLU and MATH) and generations capped at
`benchmark.max_gen_toks` keep the demo's stage to a few minutes; `benchmark.full: true` runs every item
with each task's own generation length. Per-item scores go to `items.json`, so that two rows are
compared by a paired bootstrap over the same items (`results/flexolmo31/comparisons.md`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from pathlib import Path

from flexo import timings
from flexo.errors import FlexoError
from flexo.evaluation import RUN_KEYS, default_device, hf_lm, load_tokenizer_for
from flexo.intervals import reading
from flexo.fsutil import atomic_file, atomic_path, write_json
from flexo.layout import Layout
from flexo.params import PUBLIC, Params
from flexo.project import stage_command
from flexo.scoring import load_owner_model, model_file_name, owner_model_path, require_model

log = logging.getLogger(__name__)

NOT_RUN = "–"


# ------------------------------------------------------------------------------------------ the stage
def benchmark(params: Params, layout: Layout, *, model: Path | None = None, limit: int | None = None,
              tasks: list[str] | None = None) -> dict:
    """Run the suite on every row of `benchmark.models` (or on one model folder) and write the tables."""
    from flexo.lm_tasks.suite import prepare_benchmarks

    started = time.time()
    bp = params.benchmark
    if limit is not None and limit <= 0:
        raise FlexoError(f"--limit must be a positive number of items per task, got {limit}: "
                         "set benchmark.full: true in params.yaml for every item")
    limit = None if bp.full and limit is None else (limit or bp.limit)
    names, skipped = select_tasks(bp.tasks if tasks is None else tasks)
    rows = _rows(params, layout, model)  # every input checked before anything is written
    tokenizer = load_tokenizer_for(layout.public_model if model is None else Path(model), layout.tokenizer)
    tasks_dir = prepare_benchmarks(layout.downloads, layout.root / "data" / "benchmarks")
    gen_kwargs = None if bp.full else {"max_gen_toks": bp.max_gen_toks}

    out = layout.results / ("adhoc" if model is not None else "flexolmo31")
    scores, items, eval_s = {}, {}, {}
    for name, make in rows.items():
        t0 = time.time()
        log.info("benchmark: %s on %d tasks (limit %s)", name, len(names), limit or "none")
        with make(tokenizer) as lm:
            results = run_suite(lm, tasks_dir, names, limit=limit, gen_kwargs=gen_kwargs)
        raw = out / "lm_eval" / f"{model_file_name(name)}.json"
        _write_raw(raw, results)
        scores[name], items[name] = task_scores(results, names), item_scores(results, names)
        eval_s[name] = round(time.time() - t0, 1)
        log.info("benchmark: %s done in %.0fs", name, eval_s[name])
        gc.collect()

    table = category_table(scores)
    settings = {"limit": limit or 0, "full": bp.full, "max_gen_toks": None if bp.full else bp.max_gen_toks,
                "max_length": bp.max_length}
    metrics = {"flexolmo31": table, "tasks_run": len(names), "tasks_total": suite_size(),
               "not_run": skipped, **settings}
    if model is not None:
        write_json(out / f"{model_file_name(Path(model).resolve().name)}.flexolmo31.json", metrics)
        return {**metrics, "wall_s": round(time.time() - started, 1)}
    for stale in (out / "lm_eval").glob("*.json"):  # rows no longer in benchmark.models
        if stale.stem not in {model_file_name(n) for n in rows}:
            stale.unlink()
    write_json(out / "items.json", {"format": "flexo-items-v1", **settings, "items": items})
    comparisons = paired_comparisons(items, [(a, b) for a, b in COMPARISONS if a in items and b in items])
    metrics["comparisons"] = comparisons
    write_json(out / "metrics.json", metrics)
    with atomic_file(out / "table.md") as f:
        f.write(render_table(table, skipped, len(names), settings) + "\n" + render_comparisons(comparisons))
    plot_categories(out / "scores.png", table)
    timings.record(layout.root, "benchmark", wall_s=round(time.time() - started, 1), eval_s=eval_s)
    return {"table": str(out / "table.md"), "average": {m: t["average"] for m, t in table.items()},
            "tasks_run": len(names), "not_run": len(skipped)}


# The comparisons the README states, each as (a, b): a − b with a paired bootstrap interval over items.
COMPARISONS = (("flexolmo", "public"), ("flexolmo-rt", "public"), ("flexolmo-rt", "flexolmo"),
               ("flexolmo", "btm"), ("flexolmo-rt", "btm"), ("btm", "soup"), ("soup", "public"))


def select_tasks(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """The members to run and {member: why not} for the others. `requested` = [] means every member that
    can run here; a requested member that cannot run here is an error, not a silent gap."""
    from flexo.lm_tasks.judge import current_judge
    from flexo.lm_tasks.suite import SUITE_GROUP, members

    judged = {"flexo_newsg", "flexo_poemg"}
    judge = current_judge() is not None
    reasons = {}
    for m in members():
        if not m.offline:
            reasons[m.name] = m.needs
        elif m.name in judged and not judge:
            reasons[m.name] = "an LLM judge (set FLEXO_JUDGE_MODEL, or FLEXO_JUDGE_URL + FLEXO_JUDGE_MODEL)"
    known = [m.name for m in members()]
    if not requested:
        return [n for n in known if n not in reasons], reasons
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise FlexoError(f"unknown task {unknown[0]!r}: benchmark.tasks takes members of {SUITE_GROUP}, one of "
                         f"{', '.join(known)}")
    blocked = [n for n in requested if n in reasons]
    if blocked:
        raise FlexoError(f"task {blocked[0]!r} cannot run here: it needs {reasons[blocked[0]]}; remove it from "
                         "benchmark.tasks")
    if len(set(requested)) != len(requested):
        raise FlexoError(f"benchmark.tasks lists a task twice ({requested}): list each once")
    return list(requested), {n: ("not in benchmark.tasks" if n not in reasons else reasons[n])
                             for n in known if n not in requested}


def suite_size() -> int:
    from flexo.lm_tasks.suite import members

    return len(members())


# ------------------------------------------------------------------------------------------- the rows
def _rows(params: Params, layout: Layout, model: Path | None) -> dict:
    """{row name: make(tokenizer) → context manager yielding an lm-eval LM}, every input checked now."""
    from flexo.modeling import load_config, read_meta

    ev = params.benchmark

    def folder(path: Path):
        @contextlib.contextmanager
        def make(tokenizer):
            from flexo.modeling import load_model

            yield hf_lm(load_model(path).to(default_device()).eval(), tokenizer, batch_size=ev.batch_size,
                        max_length=ev.max_length)
        return make

    if model is not None:
        model = Path(model)
        load_config(model)  # a folder that is not a FlexOlmo model: one line, before anything runs
        return {model.resolve().name: folder(model)}

    require_model(layout.public_model, "public model", "train-public")
    merged = require_model(layout.merged, "merged model", "merge")
    experts = {o: owner_model_path(layout, o) for o in params.owners}
    rt = layout.merged_rt
    tuned = (rt / "config.json").is_file() and read_meta(rt).get("tuned", True) is not False

    @contextlib.contextmanager
    def soup(tokenizer):
        from flexo.baselines import model_soup

        model = model_soup(layout.public_model, [layout.expert(o) for o in params.owners]).to(default_device())
        yield hf_lm(model.eval(), tokenizer, batch_size=ev.batch_size, max_length=ev.max_length)

    @contextlib.contextmanager
    def btm(tokenizer):
        from flexo.baselines import BTMLM

        members = [load_owner_model(layout.public_model, p) for p in [layout.public_model, *experts.values()]]
        yield BTMLM(members, tokenizer=tokenizer, names=[PUBLIC, *params.owners], batch_size=ev.batch_size,
                    max_length=ev.max_length)

    makers = {"public": folder(layout.public_model), "flexolmo": folder(merged), "soup": soup, "btm": btm}
    if tuned:
        makers["flexolmo-rt"] = folder(rt)
    elif "flexolmo-rt" in ev.models:
        log.warning("benchmark: models/merged-rt is not router-tuned (router_tune.method: none): no flexolmo-rt row")
    return {m: makers[m] for m in ev.models if m in makers}


# ------------------------------------------------------------------------------------------ running
def run_suite(lm, tasks_dir: Path, names: list[str], *, limit: int | None, gen_kwargs: dict | None) -> dict:
    """lm-eval's `simple_evaluate` of one LM on the members `names` (per-item samples kept)."""
    import os

    import lm_eval
    from flexo.lm_tasks.suite import task_manager

    if {"flexo_mbpp", "flexo_humaneval"} & set(names):
        # The code tasks run the model's code against the problems' tests (flexo.lm_tasks.utils, in a
        # subprocess with a timeout); this is the consent lm-eval asks for.
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=task_manager(Path(tasks_dir).resolve()),
                                      limit=limit, gen_kwargs=gen_kwargs, confirm_run_unsafe_code=True,
                                      log_samples=True, bootstrap_iters=0, cache_requests=False)
    if results is None:
        raise FlexoError("lm-eval returned no results (a distributed run's non-zero rank?)")
    return results


def _write_raw(path: Path, results: dict) -> None:
    import json

    from lm_eval.utils import handle_non_serializable

    def plain(obj):
        # The task configs hold the scoring hooks (`!function`): their repr carries a memory address, which
        # would change the DVC hash from one run to the next; the qualified name does not.
        if callable(obj):
            return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
        return handle_non_serializable(obj)

    kept = {k: v for k, v in results.items() if k not in RUN_KEYS}
    with atomic_file(path) as f:
        json.dump(kept, f, indent=2, default=plain, ensure_ascii=False)
        f.write("\n")


def task_scores(results: dict, names: list[str]) -> dict[str, float]:
    """{member: score on the paper's 0–100 scale} of the members that ran."""
    from flexo.lm_tasks.suite import members

    out = {}
    for m in members():
        if m.name not in names:
            continue
        value = (results["results"].get(m.name) or {}).get(m.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FlexoError(f"lm-eval reported no {m.metric} for {m.name}: see results/flexolmo31/lm_eval/")
        out[m.name] = round(float(value) * m.scale, 4)
    return out


def item_scores(results: dict, names: list[str]) -> dict[str, list[float]]:
    """{member: per-item scores (0–100), in doc order}: what a paired bootstrap resamples. A group member
    (MMLU, MATH) is one list over all its subjects' items, each weighted as the member's mean weights it."""
    from flexo.lm_tasks.suite import members

    samples = results.get("samples") or {}
    out = {}
    for m in members():
        if m.name not in names:
            continue
        metric = m.metric.split(",")[0]
        subtasks = [t for t in sorted(samples) if t == m.name or t.startswith(m.name + "_")]
        per_task = [[float(s[metric]) * m.scale for s in sorted(samples[t], key=lambda s: s["doc_id"])]
                    for t in subtasks]
        # MMLU and MATH are the unweighted mean over subjects: each item carries 1 / (subjects × its subject's items)
        out[m.name] = [v for scores in per_task for v in scores] if len(per_task) == 1 else per_task
    return out


# ------------------------------------------------------------------------------------------- tables
def category_table(scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per model: {category: mean of its members that ran, or None}, `ran` {category: [ran, total]} and
    `average`: the mean of the category scores that exist (the paper's average over those categories)."""
    from flexo.lm_tasks.suite import SUITE

    table = {}
    for model, s in scores.items():
        cats, ran = {}, {}
        for alias, (_, ms) in SUITE.items():
            vals = [s[m.name] for m in ms if m.name in s]
            cats[alias] = round(sum(vals) / len(vals), 4) if vals else None
            ran[alias] = [len(vals), len(ms)]
        present = [v for v in cats.values() if v is not None]
        table[model] = {"categories": cats, "ran": ran, "tasks": s,
                        "average": round(sum(present) / len(present), 4) if present else None,
                        "categories_run": len(present)}
    return table


def render_table(table: dict, skipped: dict[str, str], tasks_run: int, settings: dict) -> str:
    from flexo.lm_tasks.suite import SUITE

    if not table:
        return "No model was benchmarked.\n"
    first = next(iter(table.values()))
    cats = list(SUITE)
    n_cats = first["categories_run"]
    head = [f"{c} ({first['ran'][c][0]}/{first['ran'][c][1]})" for c in cats]
    avg = f"avg ({n_cats}/{len(cats)} categories, {tasks_run}/{suite_size()} tasks)"
    lines = ["| model | " + " | ".join(head) + f" | {avg} |", "|---|" + "---:|" * (len(cats) + 1)]
    best = {c: max((t["categories"][c] for t in table.values() if t["categories"][c] is not None), default=None)
            for c in cats}
    best_avg = max(t["average"] for t in table.values() if t["average"] is not None)
    for model, t in table.items():
        cells = []
        for c in cats:
            v = t["categories"][c]
            cells.append(NOT_RUN if v is None else (f"**{v:.1f}**" if v == best[c] else f"{v:.1f}"))
        a = t["average"]
        cells.append(f"**{a:.1f}**" if a == best_avg else f"{a:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    size = ("every item of every task, each task's own generation length" if settings["full"] else
            f"the first {settings['limit']} items of each task (per subject for MMLU and MATH), generations "
            f"capped at {settings['max_gen_toks']} tokens")
    why = {}
    for name, reason in skipped.items():
        why.setdefault(reason, []).append(name)
    caption = (f"The paper's 31-task suite (FlexOlmo Table 2 layout; higher is better, 0–100) with lm-eval on {size}, "
               f"context window {settings['max_length']} tokens. A category's score is the mean of its tasks that ran "
               "(ran/total in the header); the average is the mean over the categories that ran; **bold** = best in "
               f"the column; {NOT_RUN} = no task of the category could run here. Not run: "
               + "; ".join(f"{', '.join(ns)} (needs {r})" for r, ns in why.items()) + ".")
    return caption + "\n\n" + "\n".join(lines) + "\n"


def paired_comparisons(items: dict[str, dict[str, list]], pairs: list[tuple[str, str]], *, iters: int = 2000,
                       seed: int = 0) -> dict[str, dict]:
    """For each (a, b): the difference of the suite averages a − b and its 95% paired bootstrap interval,
    resampling items within each task (and within each subject of MMLU and MATH) with the same draws for
    both models, so that only the models differ."""
    import numpy as np

    from flexo.lm_tasks.suite import SUITE

    out = {}
    for a, b in pairs:
        rng = np.random.default_rng(seed)
        diffs, point = np.zeros(iters), 0.0
        cats = 0
        for _, ms in SUITE.values():
            members = [m.name for m in ms if m.name in items[a]]
            if not members:
                continue
            cats += 1
            cat_diff, cat_point = np.zeros(iters), 0.0
            for name in members:
                ga, gb = items[a][name], items[b][name]
                groups = [(np.asarray(x), np.asarray(y)) for x, y in
                          (zip(ga, gb) if ga and isinstance(ga[0], list) else [(ga, gb)])]
                mem_diff, mem_point = np.zeros(iters), 0.0
                for x, y in groups:
                    d = x - y
                    idx = rng.integers(0, len(d), size=(iters, len(d)))
                    mem_diff += d[idx].mean(axis=1) / len(groups)
                    mem_point += d.mean() / len(groups)
                cat_diff += mem_diff / len(members)
                cat_point += mem_point / len(members)
            diffs += cat_diff
            point += cat_point
        diffs, point = diffs / cats, point / cats
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        out[f"{a} - {b}"] = {"diff": round(float(point), 3), "ci95": [round(float(lo), 3), round(float(hi), 3)],
                             "shown": reading(float(lo), float(hi), a, b, lower_is_better=False)}
    return out


def render_comparisons(comparisons: dict[str, dict]) -> str:
    if not comparisons:
        return ""
    lines = ["Differences of the average (points, a − b) with 95% paired bootstrap intervals over the same items "
             "(2,000 resamples of each task's items):", "", "| a − b | difference | 95% interval | reading |",
             "|---|---:|---|---|"]
    for pair, c in comparisons.items():
        lines.append(f"| {pair} | {c['diff']:+.2f} | [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {c['shown']} |")
    return "\n".join(lines) + "\n"


def plot_categories(path: Path, table: dict) -> None:
    """Grouped bars: one group per category that ran and the average, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not table:
        return
    first = next(iter(table.values()))
    cats = [c for c, v in first["categories"].items() if v is not None]
    groups = [*cats, "average"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups)), 3.6))
    width = 0.8 / len(table)
    for i, (model, t) in enumerate(table.items()):
        values = [t["categories"][c] for c in cats] + [t["average"]]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=model)
    ax.set_xticks([g + width * (len(table) - 1) / 2 for g in range(len(groups))], groups, rotation=20)
    ax.set_ylabel("score (0–100, higher is better)")
    ax.set_title("flexolmo31: the categories that ran")
    ax.legend(fontsize=8, ncol=len(table))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_cli(sub) -> None:
    """`flexo benchmark [--model DIR] [--limit N] [--tasks A,B]`."""
    p = stage_command(sub, "benchmark", "the paper's 31-task suite with lm-eval on the public, merged, soup and BTM "
                      "models (results/flexolmo31/: Table 2 layout, metrics, plot)",
                      lambda args, project: benchmark(project.params, project.layout, model=args.model,
                                                      limit=args.limit, tasks=args.tasks))
    p.add_argument("--model", type=Path, default=None,
                   help="benchmark only this FlexOlmo model folder (results go to results/adhoc/)")
    p.add_argument("--limit", type=int, default=None, help="items per task, ≥ 1 (default: benchmark.limit)")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="comma-separated members of flexolmo31 (default: benchmark.tasks, [] = every one that can run)")
