"""The flow a data owner runs on its own machine: its stages before the merge (curate → embed → train
its expert → router statistics), then a push of what it publishes — the expert package, router row and
router statistics — to the shared DVC remote. Curated data is `push: false` in dvc.yaml: the owner's text
never leaves its machine.

    python -m flows.owner --owner news [--remote NAME]

Which stages are the owner's, and which of them are pushed, comes from dvc.yaml (flexo.pipeline_graph).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flexo.params import load_params
from flexo.pipeline_graph import stage_graph
from flows.dvc_tasks import push, run_stage


@flow(name="flexo-owner", log_prints=True)
def owner_flow(owner: str, root: str = ".", remote: str | None = None, public_stages: bool = True) -> dict:
    root_path = Path(root).resolve()
    load_params(root_path / "params.yaml").check_owner(owner)
    graph = stage_graph(root_path)
    states = {}
    # Public artifacts: pulled from the remote in a real deployment, or rebuilt here.
    for stage in (graph.public_stages if public_stages else []) + graph.owner_stages(owner):
        states[stage] = run_stage(stage, str(root_path))
    push(graph.pushed(graph.owner_stages(owner)), str(root_path), remote)
    states["push"] = "pushed"
    return states


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", required=True)
    ap.add_argument("--root", default=".")
    ap.add_argument("--remote", default=None)
    a = ap.parse_args()
    print(owner_flow(a.owner, a.root, a.remote))
