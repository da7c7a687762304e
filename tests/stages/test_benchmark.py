"""The `benchmark` stage: the 31-task suite on every model of the tiny project, its tables and intervals,
what it refuses, and `flexo tasks` for plain lm-eval users."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import copy_project, run_cli, tree
from flexo.errors import FlexoError

# One loglikelihood task, one generation task (BTM decodes by mixture), one SciRIFF yes/no task.
TASKS = ["flexo_arc_easy", "flexo_gsm8k", "flexo_sciriff_pubmedqa"]


@pytest.fixture(scope="module")
def benchmarked(tiny_project, tmp_path_factory):
    from stages.benchmark import benchmark

    project = copy_project(tiny_project, tmp_path_factory.mktemp("bench") / "p", merged=True)
    params = project.params
    params.benchmark.limit, params.benchmark.max_gen_toks, params.benchmark.max_length = 2, 6, 256
    params.benchmark.models = ["public", "flexolmo", "soup", "btm"]  # merged-rt is not tuned in this copy
    try:
        summary = benchmark(params, project.layout, tasks=TASKS)
    except FlexoError as e:
        if "could not download" in str(e):
            pytest.skip(f"no PyPI access for the benchmark data: {e}")
        raise
    return project, summary


def test_the_table_has_every_row_and_counts_what_ran(benchmarked):
    project, summary = benchmarked
    out = project.layout.results / "flexolmo31"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["flexolmo31"]) == ["public", "flexolmo", "soup", "btm"]
    assert metrics["tasks_run"] == 3 and metrics["tasks_total"] == 31
    assert metrics["not_run"]["mmlu_pro"].startswith("data on the Hugging Face hub")
    assert "not in benchmark.tasks" in metrics["not_run"]["flexo_boolq"]
    for model, row in metrics["flexolmo31"].items():
        assert set(row["tasks"]) == set(TASKS)
        assert row["ran"]["MC9"] == [1, 9] and row["ran"]["SciRIFF5"] == [1, 5] and row["ran"]["BBH"] == [0, 1]
        assert row["categories"]["BBH"] is None and row["categories_run"] == 3
        cats = [row["categories"][c] for c in ("MC9", "Math2", "SciRIFF5")]
        assert row["average"] == pytest.approx(sum(cats) / 3, abs=1e-3)  # the paper's mean over categories
        assert all(0 <= v <= 100 and math.isfinite(v) for v in row["tasks"].values())
        # MC9's score is ARC-Easy's acc_norm on 2 items: 0, 50 or 100
        assert row["categories"]["MC9"] in (0.0, 50.0, 100.0)
    table = (out / "table.md").read_text()
    assert "| btm |" in table and "avg (3/11 categories, 3/31 tasks)" in table and "MC9 (1/9)" in table
    assert "NaN" not in table and "nan" not in table
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_items_feed_paired_intervals_that_contain_the_difference(benchmarked):
    project, _ = benchmarked
    out = project.layout.results / "flexolmo31"
    items = json.loads((out / "items.json").read_text())["items"]
    assert len(items["btm"]["flexo_arc_easy"]) == 2 and len(items["public"]["flexo_gsm8k"]) == 2
    raw = json.loads((out / "lm_eval" / "public.json").read_text())
    # the per-item scores average to the task score lm-eval reported
    assert sum(items["public"]["flexo_arc_easy"]) / 2 == pytest.approx(100 * raw["results"]["flexo_arc_easy"]["acc_norm,none"])
    assert "date" not in raw and "samples" not in raw  # no run-dependent values in a DVC-hashed file
    metrics = json.loads((out / "metrics.json").read_text())
    c = metrics["comparisons"]["flexolmo - public"]
    point = metrics["flexolmo31"]["flexolmo"]["average"] - metrics["flexolmo31"]["public"]["average"]
    assert c["diff"] == pytest.approx(point, abs=2e-3)
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert c["shown"] in ("no difference shown", "flexolmo better", "public better")


def test_paired_bootstrap_of_identical_models_is_zero_and_of_a_shift_excludes_zero():
    from stages.benchmark import paired_comparisons

    a = {"flexo_arc_easy": [0.0, 100.0, 100.0, 0.0] * 5, "flexo_mmlu": [[0.0, 100.0], [100.0, 100.0, 0.0]]}
    b = {"flexo_arc_easy": [v + 10 for v in a["flexo_arc_easy"]], "flexo_mmlu": [[v + 10 for v in s] for s in a["flexo_mmlu"]]}
    same = paired_comparisons({"a": a, "b": a}, [("a", "b")])["a - b"]
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["shown"] == "no difference shown"
    shift = paired_comparisons({"a": a, "b": b}, [("a", "b")])["a - b"]
    assert shift["diff"] == pytest.approx(-10) and shift["ci95"] == [-10, -10] and shift["shown"] == "b better"


def test_task_selection_refuses_unknown_hub_and_judged_tasks(monkeypatch):
    from flexo.lm_tasks import judge
    from stages.benchmark import select_tasks

    monkeypatch.delenv("FLEXO_JUDGE_MODEL", raising=False)
    monkeypatch.delenv("FLEXO_JUDGE_URL", raising=False)
    names, skipped = select_tasks([])
    assert len(names) == 21 and "flexo_newsg" in skipped and "bbh_cot_fewshot" in skipped
    with pytest.raises(FlexoError, match="unknown task 'arc_esay'"):
        select_tasks(["arc_esay"])
    with pytest.raises(FlexoError, match="'mmlu_pro' cannot run here: it needs data on the Hugging Face hub"):
        select_tasks(["mmlu_pro"])
    with pytest.raises(FlexoError, match="'flexo_poemg' cannot run here: it needs an LLM judge"):
        select_tasks(["flexo_poemg"])
    judge.set_judge(lambda prompt: "Score: 3")
    try:
        names, skipped = select_tasks([])
        assert len(names) == 23 and "flexo_newsg" in names
    finally:
        judge.set_judge(None)


def test_bad_input_is_one_line_and_writes_nothing(tiny_project, tmp_path):
    project = copy_project(tiny_project, tmp_path / "p", merged=True)
    before = tree(project.root)
    for argv, message in (
        (["benchmark", "--limit", "0"], "--limit must be a positive number of items per task, got 0"),
        (["benchmark", "--limit", "-3"], "--limit must be a positive number"),
        (["benchmark", "--tasks", "flexo_arc_easy,hellaswag_typo"], "unknown task 'hellaswag_typo'"),
        (["benchmark", "--model", str(project.root / "data")], "is not a model folder"),
    ):
        r = run_cli(["--root", str(project.root), *argv])
        assert r.rc == 2 and r.err.count("\n") == 1 and message in r.err, (argv, r.err)
    # a dense transformers model that is not FlexOlmo
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    r = run_cli(["--root", str(project.root), "benchmark", "--model", str(dense)])
    assert r.rc == 2 and "not flex_olmo" in r.err and r.err.count("\n") == 1
    assert tree(project.root) == before  # no partial results


def test_flexo_tasks_renders_a_folder_lm_eval_runs(tiny_project, tmp_path):
    from flexo.layout import Layout
    from stages.tasks import render_tasks

    out = tmp_path / "suite"
    try:
        render_tasks(Layout.at(tiny_project.root), out)
    except FlexoError as e:
        if "could not download" in str(e):
            pytest.skip(f"no PyPI access for the benchmark data: {e}")
        raise
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(out), include_defaults=True)
    assert {"flexolmo31", "flexo_mmlu", "flexo_minerva_math", "flexo_arc_easy"} <= set(tm.all_tasks)
    # lm-eval's own command line, as an lm-eval user runs it, on the tiny public model
    # a new shell's environment: no torch.distributed rendezvous left behind by other tests (DeepSpeed's set
    # RANK/MASTER_PORT…, which makes accelerate inside lm-eval try to join a process group)
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE", "LOCAL_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in dist}, "HF_ALLOW_CODE_EVAL": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--include_path", str(out),
                        "--tasks", "flexo_arc_easy", "--model", "hf", "--model_args",
                        f"pretrained={tiny_project.public_model},dtype=float32", "--limit", "2", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "acc_norm" in r.stdout  # lm-eval's results table (the task under its alias)
    # an existing folder that flexo did not write is refused, not replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FlexoError, match="not an earlier rendered task suite"):
        render_tasks(Layout.at(tiny_project.root), mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    render_tasks(Layout.at(tiny_project.root), out)  # an earlier output is fine
