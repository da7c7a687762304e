"""Outputs that DVC hashes are deterministic: every stage, run twice on the same inputs, writes the same
bytes (no timings, dates, machine paths or other run-dependent values inside them), so a stage rerun on
another machine gives the same DVC hash and nothing downstream goes stale."""

from __future__ import annotations

import pytest

from conftest import copy_project, run_cli, tree

# Each stage (as the CLI runs it) and the outputs dvc.yaml declares for it, relative to the project root.
STAGES = [
    (["curate", "--owner", "alpha"], ["data/curated/alpha", "data/heldout/alpha"]),
    (["tokenizer"], ["models/tokenizer"]),
    (["embed", "--owner", "alpha"], ["models/router/alpha.safetensors", "models/router/alpha.json"]),
    (["train-expert", "--owner", "alpha", "--no-resume"], ["models/experts/alpha"]),
    (["router-update", "--owner", "alpha"], ["models/router_updates/alpha.safetensors",
                                             "models/router_updates/alpha.json"]),
    (["router-update", "--owner", "beta"], ["models/router_updates/beta.safetensors"]),
    (["merge"], ["models/merged"]),
    (["router-tune"], ["models/merged-rt"]),
    (["audit-extraction", "--owner", "alpha"], ["results/extraction/alpha.json"]),
    (["score", "--owner", "alpha"], ["results/scores/alpha.json"]),
    (["evaluate"], ["results/metrics.json", "results/table.md", "results/optout.md", "results/lm_eval",
                    "results/routing", "results/tasks/domains", "results/mixed.md"]),
    (["benchmark", "--tasks", "flexo_arc_easy,flexo_gsm8k"],
     ["results/flexolmo31/metrics.json", "results/flexolmo31/table.md", "results/flexolmo31/items.json",
      "results/flexolmo31/lm_eval"]),
]


def snapshot(root, outs):
    return {o: tree(root / o) if (root / o).is_dir() else tree((root / o).parent).get((root / o).name) for o in outs}


@pytest.fixture(scope="module")
def twice(tiny_project, tmp_path_factory):
    project = copy_project(tiny_project, tmp_path_factory.mktemp("det") / "p")
    root = project.root
    runs = []
    for _ in range(2):
        got = {}
        for argv, outs in STAGES:
            r = run_cli(["--root", str(root), *argv])
            assert r.rc == 0, r.err
            got[" ".join(argv)] = snapshot(root, outs)
        runs.append(got)
    return runs


@pytest.mark.parametrize("argv", [" ".join(a) for a, _ in STAGES])
def test_a_stage_run_twice_writes_the_same_bytes(twice, argv):
    first, second = twice
    assert all(v for v in first[argv].values()), f"{argv} wrote nothing to compare"
    differ = {out: sorted(f for f in {*(first[argv][out] or {}), *(second[argv][out] or {})}
                          if (first[argv][out] or {}).get(f) != (second[argv][out] or {}).get(f))
              if isinstance(first[argv][out], dict) else first[argv][out] != second[argv][out]
              for out in first[argv]}
    assert first[argv] == second[argv], {k: v for k, v in differ.items() if v}
