"""The central flow: receive every owner's published package (flows/handoff.py), run the merge stages of
dvc.yaml (merge → router tuning) and publish the merged models; once every owner has scored those
models on its own held-out text and published the scores (`python -m flows.owner --owner X
--after-merge`), run the final stage (evaluate), which builds the table from the scores. It runs in a
clone that holds no owner data at all, and refuses to run in one that does.

    python -m flows.central [--remote NAME]      # round 1: merge and publish; round 2: evaluate

The public artifacts are this clone's own (it ran flows/public_artifacts.py) or are received like the
packages. An owner that has not published, or published for another public model, stops the flow with
one line naming that owner and what it must run; owners whose scores are missing or were made for other
models are named in the flow's result (`evaluate: waiting for …`), and the evaluation waits for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flexo import federation
from flexo.errors import FlexoError
from flexo.layout import Layout
from flexo.params import CENTRAL, PUBLIC, load_params
from flexo.pipeline_graph import stage_graph
from flexo.scoring import model_fingerprints
from flows.dvc_tasks import run_stage
from flows.handoff import publish, published, receive


@flow(name="flexo-central", log_prints=True)
def central_flow(root: str = ".", remote: str | None = None) -> dict:
    root_path = Path(root).resolve()
    layout = Layout.at(root_path)
    params = load_params(root_path / "params.yaml")
    owners = params.owners
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
    graph = stage_graph(root_path)
    for stage in graph.merge_stages:
        states[stage] = run_stage(stage, str(root_path))
    states["publish-models"] = publish(CENTRAL, str(root_path), remote)

    # Round 2: the owners' scores of exactly these models.
    fingerprints = model_fingerprints(params, layout)
    waiting = []
    for owner in owners:
        if published(owner, str(root_path), federation.SCORES_FOLDER):
            states[f"receive-{owner}-scores"] = receive(owner, str(root_path), remote, kind=federation.SCORES_FOLDER)
        if federation.scores_state(layout, owner, fingerprints) != "current":
            waiting.append(owner)
    if waiting:
        states["evaluate"] = (f"waiting for the scores of {', '.join(waiting)} on these models: each runs "
                              "`python -m flows.owner --owner X --after-merge`, then rerun this flow")
        print(states["evaluate"])
        return states
    for stage in graph.final_stages:
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
