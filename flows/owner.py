"""The flow a data owner runs on its own machine, in two rounds.

Before the merge: pull the public artifacts, run its stages (curate → embed → train its expert → router
statistics), then publish its package — the expert package, router row and router statistics, nothing
else (flexo/federation.py) — to the DVC remote, with a pointer file of its own in git. The owner's text,
full model, loss log and checkpoints stay here.

After the merge (`--after-merge`): pull the merged models the centre published and the other owners'
packages, run its stages that need them (the extraction audit, and `score`: every model of the
evaluation scored on its own held-out split), and publish only the scores.

    python -m flows.owner --owner news [--remote NAME] [--build-public]
    python -m flows.owner --owner news --after-merge [--remote NAME]

Which stages are the owner's comes from dvc.yaml (flexo.pipeline_graph). `--build-public` builds the
public artifacts here instead of pulling them (one machine playing every part).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flexo.federation import SCORES_FOLDER
from flexo.params import CENTRAL, PUBLIC, load_params
from flexo.pipeline_graph import stage_graph
from flows.dvc_tasks import run_stage
from flows.handoff import publish, receive


@flow(name="flexo-owner", log_prints=True)
def owner_flow(owner: str, root: str = ".", remote: str | None = None, build_public: bool = False,
               after_merge: bool = False) -> dict:
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    params.check_owner(owner)
    print(f"flexo owner flow for {owner} in {root_path}" + (" (after the merge)" if after_merge else ""))
    graph = stage_graph(root_path)
    states = {}
    if after_merge:
        states["receive-central"] = receive(CENTRAL, str(root_path), remote)
        for other in params.owners:  # BTM, the soup and each owner's own model are rebuilt from packages
            if other != owner:
                states[f"receive-{other}"] = receive(other, str(root_path), remote)
        for stage in graph.owner_late_stages(owner):
            states[stage] = run_stage(stage, str(root_path))
        states["publish-scores"] = publish(owner, str(root_path), remote, kind=SCORES_FOLDER)
        return states
    if build_public:
        for stage in graph.public_stages:
            states[stage] = run_stage(stage, str(root_path))
    else:
        states["receive-public"] = receive(PUBLIC, str(root_path), remote)
    for stage in graph.owner_stages(owner):
        states[stage] = run_stage(stage, str(root_path))
    states["publish"] = publish(owner, str(root_path), remote)
    return states


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", required=True)
    ap.add_argument("--root", default=".")
    ap.add_argument("--remote", default=None)
    ap.add_argument("--build-public", action="store_true")
    ap.add_argument("--after-merge", action="store_true",
                    help="the second round: score the merged models the centre published, publish the scores")
    a = ap.parse_args()
    print(owner_flow(a.owner, a.root, a.remote, a.build_public, a.after_merge))
