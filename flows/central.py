"""The central flow: receive every owner's published hand-off (flows/handoff.py), then run the fan-in
stages of dvc.yaml (merge → router tuning → evaluation). It runs in a clone that holds no owner data at
all, and refuses to run in one that does.

    python -m flows.central [--remote NAME]

The public artifacts are this clone's own (it ran flows/public_artifacts.py) or are received like the packages.
An owner that has not published, or published for another public model, stops the flow with one line
naming that owner and what it must run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flexo import federation
from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.params import PUBLIC, load_params
from flexo.pipeline_graph import stage_graph
from flows.dvc_tasks import run_stage
from flows.handoff import receive


@flow(name="flexo-central", log_prints=True)
def central_flow(root: str = ".", remote: str | None = None) -> dict:
    root_path = Path(root).resolve()
    layout = Layout.at(root_path)
    owners = load_params(root_path / "params.yaml").owners
    print(f"flexo central flow in {root_path} for owners {owners}")
    here = federation.holds_owner_data(layout, owners)
    if here:
        raise FlexoError(f"{root_path} holds the data of {here}: the central flow runs only in a clone without any "
                         "owner's data (owners run flows/owner.py on their own machines)")
    states: dict = {}
    if not (layout.public_model / "flexo.json").is_file():
        states["receive-public"] = receive(PUBLIC, str(root_path), remote)
    for owner in owners:
        states[f"receive-{owner}"] = receive(owner, str(root_path), remote)
    for stage in stage_graph(root_path).central_stages:
        states[stage] = run_stage(stage, str(root_path))
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
