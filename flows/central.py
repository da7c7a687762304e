"""The central flow: pull the owners' published outputs and the public artifacts from the DVC remote,
then run the fan-in stages (merge → router tuning → evaluation). It runs in a clone that holds no owner
data at all.

    python -m flows.central [--remote NAME]

What to pull and what to run comes from dvc.yaml (flexo.pipeline_graph): the pushed outputs of the
public and owner stages, then the central stages.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flexo.params import load_params
from flexo.pipeline_graph import stage_graph
from flows.dvc_tasks import dvc, pull


@flow(name="flexo-central", log_prints=True)
def central_flow(root: str = ".", remote: str | None = None) -> dict:
    root_path = Path(root).resolve()
    owners = load_params(root_path / "params.yaml").owners
    graph = stage_graph(root_path)
    published = graph.pushed(graph.public_stages + [s for o in owners for s in graph.owner_stages(o)])
    pull(published, str(root_path), remote)
    states = {}
    for stage in graph.central_stages:
        # --single-item: the owners' upstream stages ran on their machines; their data is not here.
        dvc(["repro", "--single-item", stage], root_path)
        states[stage] = "ran"
    table = root_path / "results" / "table.md"
    if table.is_file():
        create_markdown_artifact(key="flexo-central-results", markdown=table.read_text())
    return states


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--remote", default=None)
    a = ap.parse_args()
    print(central_flow(a.root, a.remote))
