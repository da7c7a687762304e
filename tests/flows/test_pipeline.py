"""The pipeline as DVC and Prefect run it, on the tiny project: the Prefect pipeline flow over the shared
fixture's trained artifacts (each task a DVC stage), the same stage giving the same bytes through the CLI,
`dvc repro` and Prefect, an owner adding data, an owner withdrawing and `flexo status` (the exchange between machines is
tests/flows/test_federation.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import GIT, REPO, sh, tree

def dvc_project(tiny: Path, root: Path) -> Path:
    """A git + DVC project holding the shared fixture's data and trained artifacts, with this repository's
    dvc.yaml and code, and those artifacts recorded in dvc.lock (`dvc commit`) as if DVC had made them."""
    shutil.copytree(tiny, root, symlinks=True, ignore=shutil.ignore_patterns(".cache"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for package in ("flexo", "stages"):  # code deps of dvc.yaml; the installed package runs the stages
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    from flexo.pipeline_graph import stage_graph

    graph = stage_graph(root)
    done = [s for s in graph.order if s.split("@")[0] in ("curate_public", "tokenizer", "embed_public", "train_public",
                                                          "curate", "embed", "train_expert")]
    sh(root, "dvc", "commit", "--force", "--quiet", *done)
    sh(root, "git", "add", "-A")
    sh(root, *GIT, "commit", "-qm", "tiny")
    return root


def lock_stages(root: Path) -> set[str]:
    return set((yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {}))



@pytest.fixture(scope="module")
def repro_project(tiny_project, tmp_path_factory, prefect_harness):
    """The tiny project finished by the Prefect pipeline flow: what the fixture did not run (router
    statistics, merge, audits, router tuning, evaluation) runs as DVC stages through Prefect."""
    from flows.pipeline import pipeline

    root = dvc_project(tiny_project.root, tmp_path_factory.mktemp("dvc") / "proj")
    states = pipeline(root=str(root))
    ran = {s for s, state in states.items() if state == "ran"}
    assert ran == {"router_update@alpha", "router_update@beta", "merge", "audit@alpha", "audit@beta",
                   "router_tune", "score@alpha", "score@beta", "evaluate", "benchmark"}, states
    return root


def test_prefect_flow_ran_every_stage_as_dvc_would(repro_project):
    root = repro_project
    assert {"curate_public", "tokenizer", "train_public", "curate@alpha", "train_expert@beta", "merge",
            "router_tune", "evaluate", "audit@alpha"} <= lock_stages(root)
    metrics = json.loads((root / "results" / "metrics.json").read_text())
    assert set(metrics["bpb"]) >= {"public", "flexolmo", "flexolmo-rt", "soup", "btm", "expert:alpha",
                                   "optout:beta"}
    # the 31-task stage ran as a Prefect task: the Table 2 layout for the five rows, with the count of tasks run
    bench = json.loads((root / "results" / "flexolmo31" / "metrics.json").read_text())
    assert list(bench["flexolmo31"]) == ["public", "flexolmo", "flexolmo-rt", "soup", "btm"]
    assert bench["tasks_run"] == 2 and "avg (2/11 categories, 2/31 tasks)" in (
        root / "results" / "flexolmo31" / "table.md").read_text()
    # the mixed-domain suite and the paired intervals reached the central table
    assert set(metrics["mixed"]["avg"]) >= {"flexolmo", "flexolmo-rt", "btm", "btm-top2"}
    assert "flexolmo-rt - public" in metrics["comparisons"]
    assert sh(root, "dvc", "status", "--quiet", check=False).returncode == 0
    status = json.loads(sh(root, "flexo", "status", "--json").stdout)
    assert status["would_rerun"] == [] and status["owners"]["alpha"]["expert"] == "current"


def test_one_stage_gives_the_same_bytes_through_the_cli_dvc_and_prefect(repro_project, tmp_path):
    """`merge` as Prefect ran it (the fixture), as `dvc repro` runs it, and as `flexo merge` runs it."""
    by_prefect = tree(repro_project / "models" / "merged")
    via_dvc = tmp_path / "dvc"
    shutil.copytree(repro_project, via_dvc, symlinks=True)
    sh(via_dvc, "dvc", "repro", "--force", "--single-item", "merge")
    via_cli = tmp_path / "cli"
    shutil.copytree(repro_project, via_cli, symlinks=True)
    shutil.rmtree(via_cli / "models" / "merged")
    sh(via_cli, "flexo", "merge")
    assert tree(via_dvc / "models" / "merged") == by_prefect == tree(via_cli / "models" / "merged")
    assert sh(via_dvc, "dvc", "status", "--quiet", check=False).returncode == 0  # same hash as recorded


def test_adding_a_document_makes_only_that_owner_and_the_fan_in_stale(repro_project):
    root = repro_project
    (root / "data" / "owners" / "beta" / "more.txt").write_text(
        "\n".join(f"Calculate {i} + {i * 7}. Answer: {i * 8}" for i in range(40)))
    status = json.loads(sh(root, "flexo", "status", "--json").stdout)
    assert status["changed"] == ["curate@beta"]
    # beta's branch (its router statistics included), then the fan-in: the merge and everything computed
    # on the merged model (every owner's audit and scores, the router fit, the evaluation). alpha's router
    # statistics depend only on alpha's own model and text: they stay.
    assert sorted(status["would_rerun"]) == sorted(
        ["curate@beta", "embed@beta", "train_expert@beta", "merge", "router_update@beta",
         "audit@alpha", "audit@beta", "router_tune", "score@alpha", "score@beta", "evaluate", "benchmark"])
    assert status["owners"]["beta"]["expert"] == "stale" and status["owners"]["alpha"]["expert"] == "current"
    sh(root, "dvc", "repro")
    assert sh(root, "dvc", "status", "--quiet", check=False).returncode == 0


def test_withdrawing_an_owner_leaves_no_trace(repro_project):
    root = repro_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["owners"] = ["alpha"]
    params["merge"]["top_k"] = 3  # = every expert before the withdrawal (as the released RT model runs 7 of 7)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    sh(root, "dvc", "repro")
    merged = json.loads((root / "models" / "merged" / "flexo.json").read_text())
    assert merged["top_k"] == 2 and merged["top_k_requested"] == 3  # clamped to the experts left, and recorded
    assert not [s for s in lock_stages(root) if s.endswith("@beta")]
    assert not (root / "models" / "experts" / "beta").exists()
    assert not list((root / "models" / "router").glob("beta.*"))
    assert not (root / "data" / "curated" / "beta").exists() and not (root / "data" / "heldout" / "beta").exists()
    assert json.loads((root / "models" / "merged" / "flexo.json").read_text())["experts"] == ["public", "alpha"]
    metrics = (root / "results" / "metrics.json").read_text()
    assert "beta" not in metrics
    assert "beta" not in (root / "results" / "table.md").read_text()
    assert sh(root, "dvc", "status", "--quiet", check=False).returncode == 0


def test_prefect_yaml_validates_and_every_entrypoint_imports():
    import importlib

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    owners = yaml.safe_load((REPO / "params.yaml").read_text())["owners"]
    assert {"pipeline", "central", *[f"owner-{o}" for o in owners]} <= set(names)
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert flow.__class__.__name__ == "Flow"
        flow.validate_parameters(d.get("parameters", {}))  # the deployment's parameters fit the signature
        assert d["work_pool"]["name"]
